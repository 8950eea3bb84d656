"""``sparkcache export`` / ``sparkcache import`` in-process against canned
answers: what they ask, the file written only when whole, the summary, and
exit statuses (tests/e2e/test_bundle_airgap.py runs them against daemons)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.unit.test_cli import TOKEN, Canned, daemon, run  # noqa: F401 - fixture


def test_export_writes_the_file_and_says_what_it_asked(daemon: tuple[Canned, str], tmp_path: Path) -> None:  # noqa: F811
    canned, url = daemon
    canned.text("GET", "/admin/export", b"tar bytes" * 1000, ctype="application/x-tar")
    out = tmp_path / "b.tar"
    code, stdout, _ = run("--url", url, "--token", TOKEN, "export", "-o", str(out), "--remote", "a", "--remote", "b",
                          "--git", "--since", "2026-01-01")
    assert code == 0 and stdout.startswith(f"wrote {out}: ")
    assert out.read_bytes() == b"tar bytes" * 1000 and not (tmp_path / "b.tar.part").exists()
    seen = canned.seen[-1]
    assert seen["query"] == "remote=a&remote=b&since=2026-01-01&git=1" and seen["auth"] == f"Bearer {TOKEN}"


def test_an_export_refused_writes_nothing(daemon: tuple[Canned, str], tmp_path: Path) -> None:  # noqa: F811
    canned, url = daemon
    canned.json("GET", "/admin/export", {"error": "token lacks the admin scope", "status": 403}, status=403)
    code, _, err = run("--url", url, "export", "-o", str(tmp_path / "b.tar"))
    assert code == 1 and "403 token lacks the admin scope" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(params=["length", "chunked"])
def cut_off(request: pytest.FixtureRequest) -> Iterator[str]:
    """A server that promises 100,000 bytes of tar (or chunks, as the daemon
    sends it) and closes after 10."""
    head = (b"Content-Length: 100000\r\n\r\n" + b"x" * 10 if request.param == "length"
            else b"Transfer-Encoding: chunked\r\n\r\na\r\n" + b"x" * 10 + b"\r\n")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-tar\r\n" + head)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    t.join(5)
    srv.close()


def test_an_export_cut_off_leaves_no_file(cut_off: str, tmp_path: Path) -> None:
    code, _, err = run("--url", cut_off, "export", "-o", str(tmp_path / "b.tar"))
    assert code == 1 and "broke off" in err, err
    assert list(tmp_path.iterdir()) == []


def test_import_sends_the_file_and_prints_the_answer(daemon: tuple[Canned, str], tmp_path: Path) -> None:  # noqa: F811
    canned, url = daemon
    canned.json("POST", "/admin/import", {
        "imported": 3, "present": 1, "kept_newer": 0, "lost": [], "skipped_entries": 2,
        "skipped_remotes": {"gone": "no remote 'gone' on this daemon"}, "missing_in_bundle": [],
        "git": [{"name": "app", "url": "https://forge.example/app.git", "status": "imported", "mirror": "app",
                 "refs": 4}]})
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(b"y" * 300_000)
    code, stdout, _ = run("--url", url, "import", str(bundle), "--map", "a=b")
    assert code == 0, stdout
    assert "imported 3 entries (1 already present, 0 kept as newer here, 2 skipped)" in stdout
    assert "skipped remote gone: no remote 'gone'" in stdout and "git app" in stdout and "4 refs into app" in stdout
    seen = canned.seen[-1]
    assert seen["body"] == b"y" * 300_000 and seen["query"] == "map=a%3Db"
    code, stdout, _ = run("--url", url, "--json", "import", str(bundle))
    assert code == 0 and json.loads(stdout)["imported"] == 3


def test_import_failures(daemon: tuple[Canned, str], tmp_path: Path) -> None:  # noqa: F811
    canned, url = daemon
    assert run("--url", url, "import", str(tmp_path / "nope.tar"))[0] == 2
    bundle = tmp_path / "b.tar"
    bundle.write_bytes(b"z" * 100)
    code, _, err = run("--url", url, "import", str(bundle), "--map", "nonsense")
    assert code == 2 and "OLD=NEW" in err
    canned.json("POST", "/admin/import", {"error": "bad bundle: x: its sha256 is y", "status": 400}, status=400)
    code, _, err = run("--url", url, "import", str(bundle))
    assert code == 1 and err.strip() == "sparkcache import: POST /admin/import: 400 bad bundle: x: its sha256 is y"
    canned.json("POST", "/admin/import", {"imported": 0, "git": [{"name": "app", "status": "failed", "reason": "r"}]})
    assert run("--url", url, "import", str(bundle))[0] == 1
