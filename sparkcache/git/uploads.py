"""Code sync uploads: a tarball in, a normalized tar.gz of the full tree out.

An upload is read as a stream (plain tar or gzip/bzip2/xz), checked entry by
entry, and its file contents are parked in one scratch spool file (the
caller's, from the store) while their git blob ids are computed. The upload's id is the **git tree id** of the result
(the id ``git write-tree`` or ``git rev-parse <commit>^{tree}`` gives for the
same files and modes), so identical trees dedupe, and an upload of a clean
checkout of commit C has the id ``/tree-hash?branch=C`` answers.

With a base commit, the tarball holds only changed files; a root-level
``.sparkcache-deleted`` file (one path per line, UTF-8) lists removed paths
(a directory path removes everything under it). The stored result is the
full tree either way.

Everything here blocks: run it in a thread pool, never on the reactor.
"""

from __future__ import annotations

import bisect
import hashlib
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

import pygit2

from sparkcache.git.reads import (
    MODE_EXEC, MODE_GITLINK, MODE_LINK, MODE_TREE, _open, _resolve, add_member, open_targz, tar_info, walk,
)

if TYPE_CHECKING:
    from sparkcache.store import SpoolFile, SpoolReader

MODE_FILE = 0o100644
DELETED_LIST = ".sparkcache-deleted"
# Extracted uploads get one fixed time: tools that dislike 1970 (zip) accept it.
UPLOAD_MTIME = 315532800  # 1980-01-01T00:00:00Z
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    body: int = 2 << 30         # compressed request body
    expanded: int = 8 << 30     # sum of file sizes in the tree
    files: int = 500_000
    deleted_list: int = 16 << 20


class UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Member:
    mode: int                 # git filemode
    sha1: str                 # git blob id (SHA-1 object format)
    size: int = 0
    offset: int = -1          # where its bytes are in the upload's spool file
    link: bytes = b""         # symlink target
    base_oid: str = ""        # unchanged file: read it from the base commit


@dataclass
class Tree:
    files: dict[str, Member] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)
    skipped: int = 0
    blobs: "SpoolFile | None" = None  # the bytes of the uploaded files, at their offsets
    base_repo: str = ""


def _blob_sha1(size: int) -> Any:
    h = hashlib.sha1()
    h.update(b"blob %d\x00" % size)
    return h


def clean_path(name: str, what: str = "entry") -> str:
    """A tar member name → a relative path, or raise (absolute, '..', NUL)."""
    if "\x00" in name:
        raise UploadError(400, f"{what} {name!r}: NUL in path")
    if name.startswith("/"):
        raise UploadError(400, f"{what} {name!r}: absolute paths are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UploadError(400, f"{what} {name!r}: '..' is not allowed")
    return "/".join(parts)


def _inside(path: str, target: str) -> bool:
    """Whether a relative symlink at ``path`` pointing at ``target`` stays in the tree."""
    depth = 0
    for part in (posixpath.dirname(path).split("/") if "/" in path else []) + target.split("/"):
        if part in ("", "."):
            continue
        depth += -1 if part == ".." else 1
        if depth < 0:
            return False
    return True


def parse(src: BinaryIO, blobs: "SpoolFile", limits: Limits) -> Tree:
    """Read an uploaded tarball into a Tree whose file bytes go into ``blobs``,
    an empty scratch spool the caller owns (and discards once done)."""
    tree = Tree(blobs=blobs)
    dirs: set[str] = set()
    offset = 0
    expanded = 0
    src.seek(0)
    try:
        tar = tarfile.open(fileobj=src, mode="r|*")
    except tarfile.TarError as e:
        raise UploadError(400, f"not a tar archive (plain, gzip, bzip2 or xz): {e}") from None
    try:
        for m in tar:
            path = clean_path(m.name)
            if not path:
                continue
            if ".git" in path.split("/"):
                tree.skipped += 1
                continue
            if m.isdir():
                dirs.add(path)
                continue
            if path == DELETED_LIST:
                if not m.isreg() or m.size > limits.deleted_list:
                    raise UploadError(400, f"{DELETED_LIST} must be a regular file under {limits.deleted_list} bytes")
                f = tar.extractfile(m)
                assert f is not None
                text = f.read().decode("utf-8", "strict")
                tree.deleted += [clean_path(line, DELETED_LIST) for line in text.splitlines() if line.strip()]
                continue
            if m.issym():
                target = m.linkname
                if not target or target.startswith("/") or "\x00" in target or not _inside(path, target):
                    raise UploadError(400, f"symlink {path!r} -> {target!r} points outside the tree")
                data = target.encode("utf-8", "surrogateescape")
                h = _blob_sha1(len(data))
                h.update(data)
                tree.files[path] = Member(MODE_LINK, h.hexdigest(), len(data), link=data)
            elif m.islnk():
                other = tree.files.get(clean_path(m.linkname, "hard link target"))
                if other is None or other.mode == MODE_LINK:
                    raise UploadError(400, f"hard link {path!r} -> {m.linkname!r}: target is not an earlier file")
                tree.files[path] = Member(MODE_EXEC if m.mode & 0o100 else MODE_FILE, other.sha1, other.size,
                                          other.offset)
            elif m.isreg():
                expanded += m.size
                if expanded > limits.expanded:
                    raise UploadError(413, f"upload expands to more than {limits.expanded} bytes")
                f = tar.extractfile(m)
                assert f is not None
                h = _blob_sha1(m.size)
                start = offset
                while True:
                    chunk = f.read(_CHUNK)
                    if not chunk:
                        break
                    h.update(chunk)
                    blobs.write(chunk)
                    offset += len(chunk)
                if offset - start != m.size:
                    raise UploadError(400, f"{path!r}: truncated tar member")
                tree.files[path] = Member(MODE_EXEC if m.mode & 0o100 else MODE_FILE, h.hexdigest(), m.size, start)
            else:
                raise UploadError(400, f"{path!r}: only files, directories and symlinks are allowed")
            if len(tree.files) > limits.files:
                raise UploadError(413, f"more than {limits.files} files")
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as e:
        raise UploadError(400, f"unreadable tar archive: {type(e).__name__}: {e}") from None
    finally:
        tar.close()
    _check_conflicts(tree.files, dirs)
    return tree


def _check_conflicts(files: dict[str, Member], dirs: set[str]) -> None:
    for path in files:
        if path in dirs:
            raise UploadError(400, f"{path!r} is both a file and a directory")
        parent = posixpath.dirname(path)
        while parent:
            if parent in files:
                raise UploadError(400, f"{parent!r} is a file but {path!r} is under it")
            parent = posixpath.dirname(parent)


def apply_base(tree: Tree, repo_path: str, base: str) -> str:
    """Put the uploaded changes on top of ``base``'s tree; returns the base commit id."""
    repo = _open(repo_path)
    commit = _resolve(repo, base)
    merged: dict[str, Member] = {}
    for path, mode, oid in walk(repo, commit.tree):
        if mode == MODE_TREE:
            continue
        if mode not in (MODE_LINK, MODE_GITLINK, MODE_EXEC):
            mode = MODE_FILE
        sha1 = oid
        if len(oid) != 40 and mode != MODE_GITLINK:  # a SHA-256 mirror: rehash as SHA-1
            data = bytes(repo[oid].read_raw())
            h = _blob_sha1(len(data))
            h.update(data)
            sha1 = h.hexdigest()
        merged[path] = Member(mode, sha1, base_oid=oid)
    ordered = sorted(merged)

    def under(prefix: str) -> list[str]:
        # Everything below prefix/ sorts between "prefix/" and "prefix0" ("/" < "0").
        return ordered[bisect.bisect_left(ordered, prefix + "/"):bisect.bisect_left(ordered, prefix + "0")]

    for gone in tree.deleted:
        if not gone:
            raise UploadError(400, f"{DELETED_LIST} may not delete the whole tree")
        merged.pop(gone, None)
        for p in under(gone):
            merged.pop(p, None)
    for path, m in tree.files.items():
        # A file replaces a directory of the base, and a directory a file.
        for p in under(path):
            merged.pop(p, None)
        parent = posixpath.dirname(path)
        while parent:
            merged.pop(parent, None)
            parent = posixpath.dirname(parent)
        merged[path] = m
    tree.files = merged
    tree.base_repo = repo_path
    return str(commit.id)


# -- the normalized result ---------------------------------------------------------------

def _nest(files: dict[str, Member]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path, m in files.items():
        node = root
        parts = path.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = m
    return root


def _git_order(node: dict[str, Any]) -> list[str]:
    # git sorts tree entries as bytes, with a "/" after directory names.
    return sorted(node, key=lambda n: n.encode("utf-8", "surrogateescape") + (b"/" if isinstance(node[n], dict) else b""))


def tree_id(files: dict[str, Member]) -> str:
    """The git (SHA-1) tree id of the tree holding ``files``."""
    def hash_tree(node: dict[str, Any]) -> str:
        body = bytearray()
        for name in _git_order(node):
            child = node[name]
            if isinstance(child, dict):
                mode, oid = MODE_TREE, hash_tree(child)
            else:
                mode, oid = child.mode, child.sha1
            body += b"%o %s\x00" % (mode, name.encode("utf-8", "surrogateescape")) + bytes.fromhex(oid)
        return hashlib.sha1(b"tree %d\x00" % len(body) + bytes(body)).hexdigest()

    return hash_tree(_nest(files))


class _Slice:
    """A file object over bytes [offset, offset+size) of the upload's spool file."""

    def __init__(self, blobs: "SpoolReader", offset: int, size: int) -> None:
        self.blobs, self.pos, self.end = blobs, offset, offset + size

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = self.blobs.pread(n, self.pos)
        self.pos += len(data)
        return data


def write_normalized(tree: Tree, out: Any) -> int:
    """Write the tree as a reproducible tar.gz (git order, fixed times and owners)
    into ``out``; returns the number of non-directory entries."""
    repo: pygit2.Repository | None = _open(tree.base_repo) if tree.base_repo else None
    assert tree.blobs is not None, "a parsed upload has its blobs spool"
    blobs = tree.blobs.reader()
    tar, gz = open_targz(out, UPLOAD_MTIME)
    count = 0

    def emit(node: dict[str, Any], prefix: str) -> None:
        nonlocal count
        for name in _git_order(node):
            child, path = node[name], prefix + name
            if isinstance(child, dict):
                add_member(tar, tar_info(path, MODE_TREE, 0, UPLOAD_MTIME), None)
                emit(child, path + "/")
                continue
            count += 1
            if child.mode == MODE_GITLINK:
                add_member(tar, tar_info(path, MODE_GITLINK, 0, UPLOAD_MTIME), None)
            elif child.base_oid:
                assert repo is not None
                data = bytes(repo[child.base_oid].read_raw())
                if child.mode == MODE_LINK:
                    add_member(tar, tar_info(path, MODE_LINK, 0, UPLOAD_MTIME,
                                             data.decode("utf-8", "surrogateescape")), None)
                else:
                    add_member(tar, tar_info(path, child.mode, len(data), UPLOAD_MTIME), data)
            elif child.mode == MODE_LINK:
                add_member(tar, tar_info(path, MODE_LINK, 0, UPLOAD_MTIME,
                                         child.link.decode("utf-8", "surrogateescape")), None)
            else:
                tar.addfile(tar_info(path, child.mode, child.size, UPLOAD_MTIME),
                            _Slice(blobs, child.offset, child.size))  # type: ignore[arg-type]

    try:
        emit(_nest(tree.files), "")
        tar.close()
        gz.close()
    finally:
        blobs.close()
    return count
