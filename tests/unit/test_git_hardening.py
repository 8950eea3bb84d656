"""Regression tests from the git review: each failed before its fix."""

from __future__ import annotations

from pathlib import Path

from tests.support.git_upstream import GitUpstream, git


def test_upstream_commit_can_delete_a_file(tmp_path: Path) -> None:
    up = GitUpstream(tmp_path / "up")
    up.create("r", files={"keep.txt": "k\n", "dir/gone.txt": "g\n"})
    sha = up.commit({"dir/gone.txt": None, "new.txt": "n\n"}, name="r")
    names = git("ls-tree", "-r", "--name-only", sha, cwd=up.path("r")).split()
    assert names == ["keep.txt", "new.txt"]
