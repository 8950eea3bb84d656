"""Reads from a bare mirror: resolve a ref, read a file, hash a path, archive a tree.

Every function here is blocking pygit2 work: call it in the git pool
(``IMirrors.run(fn, repo_path, ...)``). Arguments and results are plain values
(str, bytes, tuples), never pygit2 objects, which must not cross threads.
Errors the caller should turn into a 4xx are ``ReadError`` with a status.
"""

from __future__ import annotations

import gzip
import io
import re
import tarfile
from typing import Any, Iterator, cast

import pygit2

MODE_TREE = 0o040000
MODE_LINK = 0o120000
MODE_GITLINK = 0o160000
MODE_EXEC = 0o100755

_HEX = re.compile(r"^[0-9a-f]{4,64}$")
_FULL_HEX = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
# Archives are written in pieces of this size, so the spool sees a steady stream.
_WRITE_CHUNK = 1 << 20


class ReadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UnknownRevision(ReadError):
    """No ref or commit by that name: a fetch might bring it (a commit just pushed)."""

    def __init__(self, spec: str) -> None:
        super().__init__(404, f"no branch, tag or commit {spec!r} in this mirror")
        self.spec = spec


def is_full_hex(spec: str) -> bool:
    return bool(_FULL_HEX.match(spec))


def normalize_path(path: str | None) -> str:
    """A repository path with no leading/trailing/doubled slashes; "" is the root.

    Dot segments and NUL bytes are refused rather than resolved: a request
    that says ``..`` is wrong, whatever it would resolve to.
    """
    if not path:
        return ""
    if "\x00" in path:
        raise ReadError(400, "NUL bytes are not allowed in paths")
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ReadError(400, "'.' and '..' are not allowed in paths")
    return "/".join(parts)


def _open(repo_path: str) -> pygit2.Repository:
    try:
        return pygit2.Repository(repo_path)
    except pygit2.GitError as e:
        raise ReadError(503, f"mirror not readable: {e}") from None


def _commit_of(obj: Any, spec: str) -> pygit2.Commit:
    try:
        return obj.peel(pygit2.Commit)
    except (ValueError, pygit2.InvalidSpecError, pygit2.GitError):
        raise ReadError(400, f"{spec!r} does not point at a commit") from None


def _resolve(repo: pygit2.Repository, spec: str) -> pygit2.Commit:
    """Branch, tag (annotated tags peeled), full ref name, HEAD, or a (short) commit id.

    Deliberately not revparse: its syntax (``:/regex``, ``@{...}``, ``~N``)
    lets a request make the server search history. Names win over hex, as in git.
    """
    if not spec or "\x00" in spec or len(spec) > 1024:
        raise ReadError(400, "a branch, tag or commit id is required")
    if spec == "HEAD":
        try:
            return _commit_of(repo.head, spec)
        except pygit2.GitError:
            raise ReadError(404, "the mirror has no HEAD") from None
    candidates = [spec] if spec.startswith("refs/") else []
    candidates += [f"refs/heads/{spec}", f"refs/tags/{spec}", f"refs/remotes/{spec}"]
    for name in candidates:
        if not pygit2.reference_is_valid_name(name):
            continue
        ref = repo.references.get(name)
        if ref is not None:
            return _commit_of(ref, spec)
    low = spec.lower()
    if _HEX.match(low):
        try:
            obj = repo.get(low)
        except ValueError:
            raise ReadError(400, f"commit id {spec!r} is ambiguous; give more digits") from None
        if obj is not None:
            return _commit_of(obj, spec)
    raise UnknownRevision(spec)


def resolve(repo_path: str, spec: str) -> str:
    """The commit id ``spec`` names (see ``_resolve``)."""
    return str(_resolve(_open(repo_path), spec).id)


def has_commit(repo_path: str, commit: str) -> bool:
    repo = _open(repo_path)
    try:
        obj = repo.get(commit)
    except ValueError:
        return False
    return obj is not None and obj.type == pygit2.GIT_OBJECT_COMMIT


def newest_known(repo_path: str, commits: list[str]) -> str | None:
    """The first of ``commits`` (newest first) that the mirror has as a commit."""
    repo = _open(repo_path)
    for c in commits:
        try:
            obj = repo.get(c)
        except ValueError:
            continue
        if obj is not None and obj.type == pygit2.GIT_OBJECT_COMMIT:
            return str(obj.id)
    return None


def list_refs(repo_path: str) -> dict[str, str]:
    """{refname: target id} for every direct ref (HEAD included when it resolves)."""
    repo = _open(repo_path)
    out: dict[str, str] = {}
    for name in repo.references:
        ref = repo.references[name]
        if ref.type == pygit2.enums.ReferenceType.DIRECT:
            out[name] = str(ref.target)
    try:
        out["HEAD"] = str(repo.head.target)
    except pygit2.GitError:
        pass
    return out


def _entry(repo: pygit2.Repository, commit: pygit2.Commit, path: str) -> tuple[str, int]:
    """(object id, filemode) at ``path`` in the commit's tree; the root tree for ""."""
    if path == "":
        return str(commit.tree.id), MODE_TREE
    try:
        obj = commit.tree[path]
    except KeyError:
        raise ReadError(404, f"no path {path!r} at commit {commit.id}") from None
    return str(obj.id), int(obj.filemode)


def kind_of(mode: int) -> str:
    if mode == MODE_TREE:
        return "tree"
    if mode == MODE_GITLINK:
        return "commit"
    return "blob"


def tree_hash(repo_path: str, spec: str, path: str) -> tuple[str, str, str]:
    """(commit id, object id at path, kind: tree | blob | commit for a submodule)."""
    repo = _open(repo_path)
    commit = _resolve(repo, spec)
    oid, mode = _entry(repo, commit, path)
    return str(commit.id), oid, kind_of(mode)


def file_info(repo_path: str, spec: str, path: str) -> tuple[str, str, int, int]:
    """(commit id, blob id, filemode, size) of the file at ``path``."""
    repo = _open(repo_path)
    commit = _resolve(repo, spec)
    if path == "":
        raise ReadError(400, "path= is required (a file in the repository)")
    oid, mode = _entry(repo, commit, path)
    if mode == MODE_TREE:
        raise ReadError(400, f"{path!r} is a directory; use /tree-hash or /archive")
    if mode == MODE_GITLINK:
        raise ReadError(400, f"{path!r} is a submodule; its contents are not in this repository")
    blob = cast(pygit2.Blob, repo[oid])
    return str(commit.id), oid, mode, int(blob.size)


def read_blob(repo_path: str, blob_id: str) -> bytes:
    """A blob's bytes (libgit2 inflates an object whole; callers bound the size)."""
    return bytes(_open(repo_path)[blob_id].read_raw())


def blob_to_file(repo_path: str, blob_id: str, out: Any) -> int:
    """Write a blob into ``out`` (anything with ``write``); returns its size."""
    data = memoryview(_open(repo_path)[blob_id].read_raw())
    for i in range(0, len(data), _WRITE_CHUNK):
        out.write(bytes(data[i:i + _WRITE_CHUNK]))
    return len(data)


def branch_contains(repo_path: str, spec: str, commit: str) -> tuple[str, str, bool]:
    """(tip of spec, full id of commit, whether commit is the tip or one of its ancestors)."""
    repo = _open(repo_path)
    tip = _resolve(repo, spec)
    # A tag or branch name works too ("is v1.2 on main?"), as in git merge-base.
    target = _resolve(repo, commit)
    contained = target.id == tip.id or bool(repo.descendant_of(tip.id, target.id))
    return str(tip.id), str(target.id), contained


# -- archives -------------------------------------------------------------------------


def walk(repo: pygit2.Repository, tree: pygit2.Tree, prefix: str = "") -> Iterator[tuple[str, int, str]]:
    """(path, filemode, object id) depth-first in git's tree order, directories included."""
    for e in tree:
        path = prefix + (e.name or "")
        mode = int(e.filemode)
        yield path, mode, str(e.id)
        if mode == MODE_TREE:
            yield from walk(repo, cast(pygit2.Tree, repo[e.id]), path + "/")


class _Sink(io.RawIOBase):
    """A write-only file object in front of anything with ``write(bytes)``."""

    def __init__(self, out: Any) -> None:
        super().__init__()
        self.out = out

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.out.write(data)
        return len(data)


def tar_info(path: str, mode: int, size: int, mtime: int, link: str = "") -> tarfile.TarInfo:
    """A TarInfo with everything that would make archives differ fixed."""
    ti = tarfile.TarInfo(path)
    ti.mtime = mtime
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    if mode == MODE_TREE or mode == MODE_GITLINK:
        ti.type, ti.mode, ti.name = tarfile.DIRTYPE, 0o755, path + "/"
    elif mode == MODE_LINK:
        ti.type, ti.mode, ti.linkname = tarfile.SYMTYPE, 0o777, link
    else:
        ti.type, ti.mode, ti.size = tarfile.REGTYPE, (0o755 if mode == MODE_EXEC else 0o644), size
    return ti


def open_targz(out: Any, mtime: int, comment: str | None = None) -> tuple[tarfile.TarFile, gzip.GzipFile]:
    """A streaming tar inside a gzip stream with a fixed header (no name, fixed mtime)."""
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=_Sink(out), mtime=mtime, compresslevel=6)  # type: ignore[arg-type]
    headers = {"comment": comment} if comment else {}
    tar = tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT, pax_headers=headers, encoding="utf-8")
    return tar, gz


def add_member(tar: tarfile.TarFile, ti: tarfile.TarInfo, data: bytes | None) -> None:
    tar.addfile(ti, io.BytesIO(data) if data is not None else None)


def write_archive(repo_path: str, spec: str, out: Any, subdir: str = "") -> tuple[str, int]:
    """A reproducible tar.gz of the tree at ``spec`` (or of its directory
    ``subdir``, whose contents then sit at the archive's root) written to ``out``.

    Entries in git's tree order, mtime = committer time, uid/gid 0, modes
    0644/0755 from git, symlinks as symlinks, submodules as empty
    directories, and for a whole tree a pax ``comment`` holding the commit id
    (as ``git archive`` writes it, so ``git get-tar-commit-id`` reads it back).
    Returns (commit id, number of entries).
    """
    repo = _open(repo_path)
    commit = _resolve(repo, spec)
    tree = commit.tree
    if subdir:
        oid, mode = _entry(repo, commit, subdir)
        if mode != MODE_TREE:
            raise ReadError(400, f"{subdir!r} is not a directory; use /file")
        tree = cast(pygit2.Tree, repo[oid])
    mtime = int(commit.commit_time)
    tar, gz = open_targz(out, mtime, None if subdir else str(commit.id))
    n = 0
    for path, mode, oid in walk(repo, tree):
        if mode in (MODE_TREE, MODE_GITLINK):
            add_member(tar, tar_info(path, mode, 0, mtime), None)
        elif mode == MODE_LINK:
            target = bytes(repo[oid].read_raw()).decode("utf-8", "surrogateescape")
            add_member(tar, tar_info(path, mode, 0, mtime, target), None)
        else:
            data = repo[oid].read_raw()
            add_member(tar, tar_info(path, mode, len(data), mtime), data)
        n += 1
    tar.close()
    gz.close()
    return str(commit.id), n
