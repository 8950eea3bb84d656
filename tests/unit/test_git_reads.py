"""sparkcache.git.reads and .uploads against bare repositories built with the git CLI;
every expected value comes from git itself (rev-parse, show, merge-base, ls-tree, write-tree)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest

from sparkcache.git import reads, uploads
from sparkcache.store import SpoolFile
from tests.support.git_upstream import git, git_env
from tests.support.tools import require_tool

LONG = "deep/" + "x" * 120 + "/file.txt"  # > 100 bytes: needs a pax path record


def _env(when: int) -> dict[str, str]:
    return git_env({"GIT_AUTHOR_DATE": f"{when} +0000", "GIT_COMMITTER_DATE": f"{when} +0000"})


def _commit(work: Path, msg: str, when: int) -> str:
    git("add", "-A", cwd=work, env=_env(when))
    git("commit", "-q", "-m", msg, cwd=work, env=_env(when))
    return git("rev-parse", "HEAD", cwd=work)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    require_tool("git")
    root = tmp_path_factory.mktemp("reads")
    work = root / "work"
    git("init", "-q", "-b", "main", str(work))
    (work / "README").write_text("hello\n")
    (work / "bin").mkdir()
    (work / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(work / "bin" / "run.sh", 0o755)
    os.symlink("README", work / "link")
    (work / "sub" / "dir").mkdir(parents=True)
    (work / "sub" / "dir" / "data.bin").write_bytes(bytes(range(256)) * 10)
    (work / "caf\u00e9.txt").write_text("unicode name\n")
    (work / LONG).parent.mkdir(parents=True)
    (work / LONG).write_text("long path\n")
    first = _commit(work, "first", 1_700_000_000)
    git("tag", "-a", "v1", "-m", "release 1", cwd=work, env=_env(1_700_000_001))
    git("tag", "light", cwd=work)
    git("checkout", "-q", "-b", "feature", cwd=work)
    (work / "feature.txt").write_text("feature\n")
    feature = _commit(work, "feature", 1_700_000_100)
    git("checkout", "-q", "main", cwd=work)
    (work / "README").write_text("hello again\n")
    # A submodule entry (gitlink) pointing at some commit.
    git("add", "README", cwd=work)
    git("update-index", "--add", "--cacheinfo", f"160000,{first},vendor/lib", cwd=work)
    git("commit", "-q", "-m", "second", cwd=work, env=_env(1_700_000_200))
    second = git("rev-parse", "HEAD", cwd=work)
    bare = root / "mirror.git"
    git("clone", "-q", "--mirror", str(work), str(bare))
    return {"path": str(bare), "first": first, "second": second, "feature": feature}


def rev(repo: dict[str, str], spec: str) -> str:
    return git("rev-parse", spec, cwd=repo["path"])


def test_resolve_branches_tags_and_ids(repo: dict[str, str]) -> None:
    p = repo["path"]
    assert reads.resolve(p, "main") == rev(repo, "main") == repo["second"]
    assert reads.resolve(p, "feature") == repo["feature"]
    assert reads.resolve(p, "HEAD") == rev(repo, "HEAD")
    # Annotated tags are peeled to their commit, lightweight ones point at it.
    assert reads.resolve(p, "v1") == rev(repo, "v1^{commit}") == repo["first"]
    assert rev(repo, "v1") != repo["first"]  # really an annotated tag object
    assert reads.resolve(p, "light") == repo["first"]
    assert reads.resolve(p, "refs/tags/v1") == repo["first"]
    assert reads.resolve(p, repo["feature"]) == repo["feature"]
    assert reads.resolve(p, repo["feature"][:10]) == repo["feature"]
    assert reads.resolve(p, repo["feature"].upper()) == repo["feature"]


@pytest.mark.parametrize("spec", ["nope", "main~1", "main^", ":/first", "main@{0}", "0" * 40, "refs/heads/nope"])
def test_resolve_unknown_is_404(repo: dict[str, str], spec: str) -> None:
    with pytest.raises(reads.UnknownRevision) as e:
        reads.resolve(repo["path"], spec)
    assert e.value.status == 404


def test_resolve_tree_id_is_not_a_commit(repo: dict[str, str]) -> None:
    tree = rev(repo, "main^{tree}")
    with pytest.raises(reads.ReadError) as e:
        reads.resolve(repo["path"], tree)
    assert e.value.status == 400


@pytest.mark.parametrize("path", ["", "README", "bin", "bin/run.sh", "sub/dir", "sub/dir/data.bin", "link",
                                  "caf\u00e9.txt", LONG, "vendor/lib"])
def test_tree_hash_matches_rev_parse(repo: dict[str, str], path: str) -> None:
    commit, oid, kind = reads.tree_hash(repo["path"], "main", path)
    assert commit == repo["second"]
    assert oid == rev(repo, f"main:{path}")
    assert kind == git("cat-file", "-t", oid, cwd=repo["path"]) if kind != "commit" else True
    if path == "vendor/lib":
        assert kind == "commit" and oid == repo["first"]


def test_tree_hash_missing_path(repo: dict[str, str]) -> None:
    with pytest.raises(reads.ReadError) as e:
        reads.tree_hash(repo["path"], "main", "feature.txt")  # only on the feature branch
    assert e.value.status == 404
    assert reads.tree_hash(repo["path"], "feature", "feature.txt")[1] == rev(repo, "feature:feature.txt")


@pytest.mark.parametrize("path", ["README", "bin/run.sh", "sub/dir/data.bin", "link", "caf\u00e9.txt", LONG])
def test_file_matches_git_show(repo: dict[str, str], path: str) -> None:
    commit, blob, mode, size = reads.file_info(repo["path"], "main", path)
    shown = subprocess.run(["git", "cat-file", "blob", f"main:{path}"], cwd=repo["path"], capture_output=True,
                           check=True, env=git_env()).stdout
    assert blob == rev(repo, f"main:{path}")
    assert reads.read_blob(repo["path"], blob) == shown
    assert size == len(shown)
    ls = git("ls-tree", "main", "--", path, cwd=repo["path"])
    assert int(ls.split()[0], 8) == mode
    out = io.BytesIO()
    assert reads.blob_to_file(repo["path"], blob, out) == len(shown) and out.getvalue() == shown


def test_file_of_old_version_and_errors(repo: dict[str, str]) -> None:
    _, blob, _, _ = reads.file_info(repo["path"], "v1", "README")
    assert reads.read_blob(repo["path"], blob) == b"hello\n"
    for path, status in (("bin", 400), ("vendor/lib", 400), ("", 400), ("nope", 404), ("README/x", 404)):
        with pytest.raises(reads.ReadError) as e:
            reads.file_info(repo["path"], "main", path)
        assert e.value.status == status, path


@pytest.mark.parametrize("raw,norm", [("/a//b/", "a/b"), ("", ""), ("/", ""), ("a", "a")])
def test_normalize_path(raw: str, norm: str) -> None:
    assert reads.normalize_path(raw) == norm


@pytest.mark.parametrize("raw", ["../etc/passwd", "a/../../b", "a/./b", "a\x00b"])
def test_normalize_path_refuses_dots(raw: str) -> None:
    with pytest.raises(reads.ReadError):
        reads.normalize_path(raw)


def _is_ancestor(repo: dict[str, str], a: str, b: str) -> bool:
    return subprocess.run(["git", "merge-base", "--is-ancestor", a, b], cwd=repo["path"], env=git_env()).returncode == 0


@pytest.mark.parametrize("branch,commit", [("main", "first"), ("main", "second"), ("main", "feature"),
                                           ("feature", "first"), ("feature", "second"), ("v1", "second")])
def test_branch_contains_matches_merge_base(repo: dict[str, str], branch: str, commit: str) -> None:
    tip, full, contained = reads.branch_contains(repo["path"], branch, repo[commit][:12])
    assert tip == rev(repo, f"{branch}^{{commit}}") and full == repo[commit]
    assert contained == _is_ancestor(repo, repo[commit], branch)


def test_branch_contains_unknown_commit(repo: dict[str, str]) -> None:
    with pytest.raises(reads.UnknownRevision):
        reads.branch_contains(repo["path"], "main", "f" * 40)


def test_newest_known_and_refs(repo: dict[str, str]) -> None:
    p = repo["path"]
    assert reads.newest_known(p, ["e" * 40, repo["feature"], repo["first"]]) == repo["feature"]
    assert reads.newest_known(p, ["e" * 40]) is None
    assert reads.newest_known(p, [rev(repo, "main^{tree}")]) is None  # a tree is not a commit
    refs = reads.list_refs(p)
    expected = dict(line.split(" ", 1)[::-1] for line in git("show-ref", cwd=p).splitlines())
    assert {k: v for k, v in refs.items() if k != "HEAD"} == expected
    assert refs["HEAD"] == repo["second"]


def _tar_members(data: bytes) -> dict[str, tuple[str, int, bytes | str]]:
    out: dict[str, tuple[str, int, bytes | str]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar:
            if m.isdir():
                out[m.name.rstrip("/")] = ("dir", m.mode, b"")
            elif m.issym():
                out[m.name] = ("link", m.mode, m.linkname)
            else:
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = ("file", m.mode, f.read())
    return out


def test_archive_matches_ls_tree_and_is_reproducible(repo: dict[str, str]) -> None:
    p = repo["path"]
    a, b = io.BytesIO(), io.BytesIO()
    commit, n = reads.write_archive(p, "main", a)
    assert commit == repo["second"]
    reads.write_archive(p, repo["second"], b)
    assert a.getvalue() == b.getvalue()
    members = _tar_members(a.getvalue())
    assert len(members) == n
    listing = git("ls-tree", "-r", "-t", "-z", "main", cwd=p).split("\0")
    expected: dict[str, tuple[str, int, bytes | str]] = {}
    for line in filter(None, listing):
        meta, path = line.split("\t", 1)
        mode, kind, oid = meta.split()
        if kind == "tree" or kind == "commit":
            expected[path] = ("dir", 0o755, b"")
        elif mode == "120000":
            expected[path] = ("link", 0o777, git("cat-file", "blob", oid, cwd=p))
        else:
            data = subprocess.run(["git", "cat-file", "blob", oid], cwd=p, capture_output=True, check=True).stdout
            expected[path] = ("file", 0o755 if mode == "100755" else 0o644, data)
    assert members == expected
    with tarfile.open(fileobj=io.BytesIO(a.getvalue()), mode="r:gz") as tar:
        first = tar.next()
        assert first is not None and first.mtime == 1_700_000_200 and first.uid == 0 and first.uname == "root"
        assert tar.pax_headers.get("comment") == commit
    # git itself reads the commit id back from the archive.
    got = subprocess.run(["git", "get-tar-commit-id"], input=gzip.decompress(a.getvalue()), capture_output=True,
                         env=git_env()).stdout.decode().strip()
    assert got == commit


def test_archive_equals_git_archive_contents(repo: dict[str, str], tmp_path: Path) -> None:
    """Same files and contents as `git archive`, extracted side by side (gzip bytes differ)."""
    ours = io.BytesIO()
    reads.write_archive(repo["path"], "feature", ours)
    theirs = subprocess.run(["git", "archive", "--format=tar", "feature"], cwd=repo["path"], capture_output=True,
                            check=True, env=git_env()).stdout
    for name, data in (("ours", gzip.decompress(ours.getvalue())), ("theirs", theirs)):
        d = tmp_path / name
        d.mkdir()
        subprocess.run(["tar", "-xf", "-", "-C", str(d)], input=data, check=True)

    def snapshot(d: Path) -> dict[str, object]:
        out: dict[str, object] = {}
        for p in sorted(d.rglob("*")):
            rel = str(p.relative_to(d))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = ("file", p.read_bytes(), os.access(p, os.X_OK))
            else:
                out[rel] = "dir"
        return out

    assert snapshot(tmp_path / "ours") == snapshot(tmp_path / "theirs")


# -- uploads ------------------------------------------------------------------------------


def _tarball(entries: Sequence[tuple[str, str, Any]], gz: bool = True) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for kind, name, data in entries:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, str(data)
                tar.addfile(ti)
            elif kind == "fifo":
                ti.type = tarfile.FIFOTYPE
                tar.addfile(ti)
            elif kind == "chr":
                ti.type = tarfile.CHRTYPE
                tar.addfile(ti)
            else:
                raw = data.encode() if isinstance(data, str) else data
                ti.size, ti.mode = len(raw), (0o755 if kind == "exec" else 0o644)
                tar.addfile(ti, io.BytesIO(raw))
    buf.seek(0)
    return buf


def _write_tree(files: dict[str, tuple[str, bytes | str]], root: Path) -> str:
    """The tree id git computes for these files."""
    work = root / "wt"
    git("init", "-q", str(work))
    for path, (kind, data) in files.items():
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "link":
            os.symlink(str(data), target)
        else:
            target.write_bytes(data.encode() if isinstance(data, str) else data)
            os.chmod(target, 0o755 if kind == "exec" else 0o644)
    git("add", "-A", cwd=work)
    return git("write-tree", cwd=work)


@contextmanager
def parsed(src: Any, spool_dir: Path, limits: uploads.Limits) -> Iterator[uploads.Tree]:
    """``uploads.parse`` into a scratch spool in ``spool_dir``, discarded afterwards (as code sync does)."""
    blobs = SpoolFile(str(spool_dir), "upload-", hashed=False)
    try:
        yield uploads.parse(src, blobs, limits)
    finally:
        blobs.discard()


def test_upload_id_is_git_tree_id(tmp_path: Path) -> None:
    entries = [("dir", "./", b""), ("file", "./a.txt", "A\n"), ("exec", "./bin/tool", "#!/bin/sh\n"),
               ("link", "./bin/a", "../a.txt"), ("file", "./.git/config", "skipped"), ("dir", "./empty", b""),
               ("hard", "./copy.txt", "./a.txt")]
    for gz in (True, False):
        with parsed(_tarball(entries, gz), tmp_path, uploads.Limits()) as tree:
            assert tree.skipped == 1
            expected = _write_tree({"a.txt": ("file", "A\n"), "bin/tool": ("exec", "#!/bin/sh\n"),
                                    "bin/a": ("link", "../a.txt"), "copy.txt": ("file", "A\n")}, tmp_path / str(gz))
            assert uploads.tree_id(tree.files) == expected
            out = io.BytesIO()
            assert uploads.write_normalized(tree, out) == 4
            members = _tar_members(out.getvalue())
            assert members == {"a.txt": ("file", 0o644, b"A\n"), "bin": ("dir", 0o755, b""),
                               "bin/a": ("link", 0o777, "../a.txt"), "bin/tool": ("file", 0o755, b"#!/bin/sh\n"),
                               "copy.txt": ("file", 0o644, b"A\n")}
            again = io.BytesIO()
            uploads.write_normalized(tree, again)
            assert hashlib.sha256(again.getvalue()).digest() == hashlib.sha256(out.getvalue()).digest()
        assert tree.blobs is not None and not os.path.exists(tree.blobs.path)


@pytest.mark.parametrize("entries,status", [
    ([("file", "/etc/passwd", "x")], 400),
    ([("file", "a/../../x", "x")], 400),
    ([("link", "l", "/etc/passwd")], 400),
    ([("link", "d/l", "../../x")], 400),
    ([("fifo", "p", b"")], 400),
    ([("chr", "c", b"")], 400),
    ([("hard", "h", "missing")], 400),
    ([("file", "a", "x"), ("file", "a/b", "y")], 400),
])
def test_upload_rejects_unsafe_entries(tmp_path: Path, entries: list[tuple[str, str, bytes | str]], status: int) -> None:
    with pytest.raises(uploads.UploadError) as e:
        with parsed(_tarball(entries), tmp_path, uploads.Limits()):
            pass
    assert e.value.status == status
    assert os.listdir(tmp_path) == []  # the spool file is gone


def test_upload_limits_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(uploads.UploadError) as e:
        with parsed(_tarball([("file", "a", "x" * 100)]), tmp_path, uploads.Limits(expanded=50)):
            pass
    assert e.value.status == 413
    with pytest.raises(uploads.UploadError) as e:
        with parsed(_tarball([("file", "a", "1"), ("file", "b", "2")]), tmp_path, uploads.Limits(files=1)):
            pass
    assert e.value.status == 413
    with pytest.raises(uploads.UploadError) as e:
        with parsed(io.BytesIO(b"this is not a tarball" * 100), tmp_path, uploads.Limits()):
            pass
    assert e.value.status == 400
    truncated = _tarball([("file", "a", os.urandom(100_000))], gz=False).getvalue()[:50_000]
    with pytest.raises(uploads.UploadError):
        with parsed(io.BytesIO(truncated), tmp_path, uploads.Limits()):
            pass
    assert os.listdir(tmp_path) == []


def test_incremental_upload_on_a_base(repo: dict[str, str], tmp_path: Path) -> None:
    p = repo["path"]
    entries = [("file", "README", "changed\n"), ("file", "new/file.txt", "new\n"),
               ("file", uploads.DELETED_LIST, "bin\nfeature-not-here\ncaf\u00e9.txt\n")]
    with parsed(_tarball(entries), tmp_path, uploads.Limits()) as tree:
        assert uploads.apply_base(tree, p, "main") == repo["second"]
        # What git computes for the same change made in a checkout.
        work = tmp_path / "check"
        git("clone", "-q", p, str(work))
        (work / "README").write_text("changed\n")
        (work / "new").mkdir()
        (work / "new" / "file.txt").write_text("new\n")
        git("rm", "-q", "-r", "bin", "caf\u00e9.txt", cwd=work)
        git("add", "-A", cwd=work)
        # the clone has no submodule checkout; keep the gitlink entry as in the base
        assert uploads.tree_id(tree.files) == git("write-tree", cwd=work)
        out = io.BytesIO()
        uploads.write_normalized(tree, out)
        members = _tar_members(out.getvalue())
        assert members["README"][2] == b"changed\n" and members["new/file.txt"][2] == b"new\n"
        assert "bin/run.sh" not in members and "caf\u00e9.txt" not in members
        assert members["sub/dir/data.bin"][2] == bytes(range(256)) * 10
        assert members["link"] == ("link", 0o777, "README")
        assert members["vendor/lib"][0] == "dir"
        assert uploads.DELETED_LIST not in members


def test_incremental_file_replaces_directory(repo: dict[str, str], tmp_path: Path) -> None:
    with parsed(_tarball([("file", "sub", "now a file\n")]), tmp_path, uploads.Limits()) as tree:
        uploads.apply_base(tree, repo["path"], repo["first"])
        assert "sub" in tree.files and not any(k.startswith("sub/") for k in tree.files)


def test_archive_of_a_subdirectory_matches_git_archive(repo: dict[str, str], tmp_path: Path) -> None:
    ours = io.BytesIO()
    commit, n = reads.write_archive(repo["path"], "main", ours, "sub")
    assert commit == repo["second"]
    theirs = subprocess.run(["git", "archive", "--format=tar", "main:sub"], cwd=repo["path"], capture_output=True,
                            check=True, env=git_env()).stdout
    with tarfile.open(fileobj=io.BytesIO(theirs)) as tar:
        expected = {m.name.rstrip("/") for m in tar}
    members = _tar_members(ours.getvalue())
    assert set(members) == expected == {"dir", "dir/data.bin"} and n == 2
    assert members["dir/data.bin"][2] == bytes(range(256)) * 10
    with tarfile.open(fileobj=io.BytesIO(ours.getvalue()), mode="r:gz") as t:
        assert "comment" not in t.pax_headers  # a tree, not a commit: as git archive does
    for path, status in (("README", 400), ("nope", 404)):
        with pytest.raises(reads.ReadError) as e:
            reads.write_archive(repo["path"], "main", io.BytesIO(), path)
        assert e.value.status == status
