"""16 parallel clones through the cache: identical results, fsck-clean."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support.git_upstream import (  # noqa: F401 - fixture
    GitUpstream,
    git,
    git_client,
    git_daemon_config,
    git_upstream_factory,
)

CLONES = 16


def test_parallel_clones_identical_and_fsck_clean(git_upstream_factory: Any, daemon_factory: Any,
                                                  tmp_path: Path) -> None:
    up: GitUpstream = git_upstream_factory()
    up.create("app", files={"README": "v0\n"})
    for i in range(1, 6):
        up.commit({f"data/{i}.bin": os.urandom(40_000), "README": f"v{i}\n"}, f"commit {i}", name="app")
    up.tag("v1.0", up.rev("refs/heads/main", "app"), name="app")
    d = daemon_factory(extra=git_daemon_config({"app": up.url("app")}))
    home = tmp_path / "home"

    def clone(i: int) -> tuple[str, str]:
        out = tmp_path / f"c{i}"
        # Half v2, half v0: both paths run concurrently against one mirror.
        git_client("-c", f"protocol.version={2 if i % 2 else 0}", "clone", "-q", d.url("/git/app"), str(out),
                   home=home, timeout=120)
        git("fsck", "--strict", "--no-dangling", cwd=out)
        return (git("rev-parse", "HEAD", "HEAD^{tree}", "v1.0", cwd=out),
                git("for-each-ref", "--format=%(refname) %(objectname)", "refs/remotes", "refs/tags", cwd=out))

    with ThreadPoolExecutor(CLONES) as pool:
        results = list(pool.map(clone, range(CLONES)))
    assert len(set(results)) == 1, results
    assert results[0][0].splitlines()[0] == up.rev("refs/heads/main", "app")
    # The mirror was cloned once for all of them (first use is single-flight).
    assert up.count("app", "git-upload-pack", "POST") == 1, up.describe()
    metrics = d.get("/metrics").body.decode()
    assert f'sparkcache_requests_total{{remote="git",result="advertise"}} {float(CLONES)}' in metrics, metrics
    assert 'remote="git",result="error"' not in metrics, metrics
