"""pip and uv install through the cache from a local simple-index upstream
built in the test (JSON-capable or HTML-only, absolute or relative links):
cold, warm with the upstream stopped, yanked versions skipped, a tampered
file refused, and pypiserver (HTML only) as the upstream."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.client import request
from tests.support.daemon import free_port
from tests.support.pypi_clients import JSON_TYPE, index, installed, ok, pip, tool, uv  # noqa: F401
from tests.support.pypi_packages import sdist, sha256, wheel
from tests.support.pypi_upstream import IndexUpstream

def test_cold_then_warm_with_the_upstream_stopped(index: IndexUpstream, daemon_factory: Any, tmp_path: Path) -> None:
    app, helper = wheel("demo-app", "1.0", requires=("demo-helper>=1",)), wheel("demo-helper", "1.2")
    index.add("demo-app", app, sdist("demo-app", "1.0")).add("demo-helper", wheel("demo-helper", "0.9"), helper)
    index.add("src-only", sdist("src-only", "1.0"))
    d = daemon_factory({"py": {"type": "pypi", "upstream": index.index_url}})
    url = f"{d.base_url}/pypi/py/simple/"

    ok(pip(url, tmp_path / "t1", "demo-app==1.0", tmp=tmp_path))
    assert installed(tmp_path / "t1", "demo_app") == "demo-app==1.0"
    assert installed(tmp_path / "t1", "demo_helper") == "demo-helper==1.2"
    ok(uv(url, tmp_path / "t2", "demo-app==1.0", tmp=tmp_path))
    assert installed(tmp_path / "t2", "demo_helper") == "demo-helper==1.2"
    # pip and uv asked for JSON; upstream was asked for JSON too.
    assert any(p == "/simple/demo-app/" and a.startswith(JSON_TYPE) for p, a in index.requests)
    # An sdist, built by the clients (an in-tree backend: offline).
    ok(pip(url, tmp_path / "s1", "src-only==1.0", tmp=tmp_path))
    assert installed(tmp_path / "s1", "src_only") == "src-only==1.0 (sdist)"
    ok(uv(url, tmp_path / "s2", "src-only==1.0", tmp=tmp_path))
    assert installed(tmp_path / "s2", "src_only") == "src-only==1.0 (sdist)"
    # Each file came from upstream once, whatever the clients fetched.
    assert index.count(f"/packages/{app.filename}") == 1 and index.count(f"/packages/{helper.filename}") == 1

    index.stop()
    ok(pip(url, tmp_path / "t3", "demo-app==1.0", tmp=tmp_path))
    assert installed(tmp_path / "t3", "demo_helper") == "demo-helper==1.2"
    ok(uv(url, tmp_path / "t4", "demo-app==1.0", tmp=tmp_path))
    ok(pip(url, tmp_path / "s3", "src-only==1.0", tmp=tmp_path))
    assert index.count("/packages/src_only-1.0.tar.gz") == 1
    # The sdist is listed and served like the wheels.
    page = d.get("/pypi/py/simple/demo-app/", headers={"Accept": JSON_TYPE})
    assert page.status == 200 and page.header("Vary") == "Accept"
    src = next(f for f in page.json()["files"] if f["filename"].endswith(".tar.gz"))
    assert src["url"].startswith(f"{d.base_url}/pypi/py/files/demo-app/")


def test_yanked_versions_are_skipped(index: IndexUpstream, daemon_factory: Any, tmp_path: Path) -> None:
    index.add("yanky", wheel("yanky", "1.0"), wheel("yanky", "2.0", yanked="broken"))
    d = daemon_factory({"py": {"type": "pypi", "upstream": index.index_url}})
    url = f"{d.base_url}/pypi/py/simple/"
    ok(pip(url, tmp_path / "p", "yanky", tmp=tmp_path))
    assert installed(tmp_path / "p", "yanky") == "yanky==1.0"
    ok(uv(url, tmp_path / "u", "yanky", tmp=tmp_path))
    assert installed(tmp_path / "u", "yanky") == "yanky==1.0"
    html = d.get("/pypi/py/simple/yanky/").body.decode()
    assert 'data-yanked="broken"' in html


def test_a_tampered_file_is_refused_and_never_kept(index: IndexUpstream, daemon_factory: Any,
                                                   tmp_path: Path) -> None:
    good = wheel("victim", "1.0")
    index.add("victim", good)
    index.tamper(good.filename)
    d = daemon_factory({"py": {"type": "pypi", "upstream": index.index_url}})
    url = f"{d.base_url}/pypi/py/simple/"
    proc = pip(url, tmp_path / "bad", "victim==1.0", tmp=tmp_path)
    assert proc.returncode != 0
    assert not (tmp_path / "bad" / "victim").exists()
    fetched = index.count(f"/packages/{good.filename}")
    assert fetched >= 1
    # Nothing was kept: once upstream serves the right bytes, they are fetched again and installed.
    index.tamper(good.filename, on=False)
    ok(pip(url, tmp_path / "good", "victim==1.0", tmp=tmp_path))
    assert installed(tmp_path / "good", "victim") == "victim==1.0"
    assert index.count(f"/packages/{good.filename}") == fetched + 1


@pytest.mark.parametrize("links", ["relative", "root"])
def test_an_html_only_upstream_with_relative_links(links: str, daemon_factory: Any, tmp_path: Path) -> None:
    up = IndexUpstream(json=False, links=links).start()
    try:
        w = wheel("rel-pkg", "3.1", requires_python=">=3.6")
        up.add("rel-pkg", w)
        d = daemon_factory({"py": {"type": "pypi", "upstream": up.index_url}})
        url = f"{d.base_url}/pypi/py/simple/"
        ok(pip(url, tmp_path / "p", "rel-pkg==3.1", tmp=tmp_path))
        ok(uv(url, tmp_path / "u", "rel-pkg==3.1", tmp=tmp_path))
        assert installed(tmp_path / "u", "rel_pkg") == "rel-pkg==3.1"
        page = d.get("/pypi/py/simple/rel-pkg/", headers={"Accept": JSON_TYPE}).json()
        f = page["files"][0]
        assert f["url"] == f"{d.base_url}/pypi/py/files/rel-pkg/{w.filename}"
        assert f["core-metadata"] == {"sha256": sha256(w.metadata or b"")}
        assert f["requires-python"] == ">=3.6"
        html = d.get("/pypi/py/simple/rel-pkg/", headers={"Accept": "text/html"}).body.decode()
        assert f'href="{d.base_url}/pypi/py/files/rel-pkg/{w.filename}#sha256={w.sha256}"' in html
        # Each form of the page was asked of upstream in its own form (pip and uv asked for JSON only).
        asked = {a.split(",")[0] for p, a in up.requests if p == "/simple/rel-pkg/"}
        assert asked == {JSON_TYPE, "application/vnd.pypi.simple.v1+html"}, up.requests
        assert up.count(f"/packages/{w.filename}") == 1
    finally:
        up.stop()


def test_pypiserver_as_the_upstream(daemon_factory: Any, tmp_path: Path) -> None:
    server = tool("pypi-server")
    packages = tmp_path / "packages"
    packages.mkdir()
    w1, w2 = wheel("served-pkg", "1.0"), wheel("served-pkg", "1.1")
    for w in (w1, w2):
        (packages / w.filename).write_bytes(w.data)
    port = free_port()
    proc = subprocess.Popen([server, "run", "-p", str(port), "-i", "127.0.0.1", "-a", ".", "-P", ".",
                             str(packages)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if request(port, "GET", "/simple/", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "pypi-server did not start"
            time.sleep(0.1)
        d = daemon_factory({"py": {"type": "pypi", "upstream": f"http://127.0.0.1:{port}/simple"}})
        url = f"{d.base_url}/pypi/py/simple/"
        ok(pip(url, tmp_path / "p", "served-pkg==1.0", tmp=tmp_path))
        assert installed(tmp_path / "p", "served_pkg") == "served-pkg==1.0"
        ok(uv(url, tmp_path / "u", "served-pkg", tmp=tmp_path))
        assert installed(tmp_path / "u", "served_pkg") == "served-pkg==1.1"
        page = d.get("/pypi/py/simple/served-pkg/", headers={"Accept": JSON_TYPE})
        assert page.status == 200 and page.header("Content-Type") == JSON_TYPE
        hashes = {f["filename"]: f["hashes"] for f in page.json()["files"]}
        assert hashes[w1.filename] == {"sha256": w1.sha256}
        proc.terminate()
        proc.wait(10)
        ok(pip(url, tmp_path / "warm", "served-pkg==1.1", tmp=tmp_path))
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
