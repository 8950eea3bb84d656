"""Drop-in configuration: ``cache.d/*.yaml`` beside ``cache.yaml`` adds remotes
and git repositories (one file per team or tool, as configuration management
writes them); a name defined twice, or a setting a drop-in may not hold, is an
error naming the file at fault; a reload reads them again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from sparkcache.config import ConfigError, dropin_dir
from sparkcache.protocols import load_config
from sparkcache.reload import LiveConfig

MAIN = """
storage: {data_dir: DATA}
remotes:
  files: {type: generic, upstream: "https://files.example"}
"""


@pytest.fixture
def main(tmp_path: Path) -> Path:
    p = tmp_path / "cache.yaml"
    p.write_text(MAIN.replace("DATA", str(tmp_path / "data")))
    (tmp_path / "cache.d").mkdir()
    return p


def dropin(main: Path, name: str, text: str) -> Path:
    p = Path(dropin_dir(str(main))) / name
    p.write_text(text)
    return p


def test_dropins_add_remotes_and_repos_in_name_order(main: Path) -> None:
    dropin(main, "20-team-b.yaml", "remotes:\n  npm-b: {type: npm, upstream: 'https://npm.mirror.example'}\n")
    dropin(main, "10-team-a.yaml", "remotes:\n  tools: {type: generic, upstream: 'https://tools.example'}\n"
                                   "git:\n  repos:\n    app: https://forge.example/org/app.git\n")
    dropin(main, "notes.txt", "not yaml, not read")
    dropin(main, ".hidden.yaml", "remotes: {x: {type: nope}}\n")  # editors' swap files are skipped
    cfg = load_config(str(main), {})
    assert set(cfg.remotes) == {"files", "tools", "npm-b"}
    assert cfg.section("git").repos["app"].url == "https://forge.example/org/app.git"


def test_without_a_dropin_folder_the_file_alone_loads(tmp_path: Path) -> None:
    p = tmp_path / "cache.yaml"
    p.write_text(MAIN.replace("DATA", str(tmp_path / "data")))
    assert set(load_config(str(p), {}).remotes) == {"files"}


def test_a_name_defined_twice_names_both_files(main: Path) -> None:
    a = dropin(main, "10-a.yaml", "remotes:\n  tools: {type: generic, upstream: 'https://a.example'}\n")
    b = dropin(main, "20-b.yaml", "remotes:\n  tools: {type: generic, upstream: 'https://b.example'}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(main), {})
    assert str(e.value) == f"{b}: remotes.tools: already defined in {a}"
    b.write_text("remotes:\n  files: {type: generic, upstream: 'https://b.example'}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(main), {})
    assert str(e.value) == f"{b}: remotes.files: already defined in {main}"


def test_an_error_in_a_dropin_remote_names_the_dropin(main: Path) -> None:
    bad = dropin(main, "10-a.yaml", "remotes:\n  tools: {type: generic, upstream: 'https://a.example', colour: red}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(main), {})
    assert str(e.value).startswith(f"{bad}: remotes.tools.colour: ")


@pytest.mark.parametrize("text, where", [
    ("storage: {max_size: 1GiB}\n", "storage: a drop-in may add remotes: and git: repos: only"),
    ("git: {fetch_interval: 1s}\n", "git: a drop-in's git: may hold repos: only"),
    ("remotes: [a, b]\n", "remotes: expected a mapping"),
    ("- just a list\n", "expected a mapping"),
    ("remotes: {a: [unclosed\n", "invalid YAML"),
])
def test_what_a_dropin_may_not_hold(main: Path, text: str, where: str) -> None:
    bad = dropin(main, "10-bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(str(main), {})
    assert str(e.value).startswith(f"{bad}: ") and where in str(e.value), str(e.value)


@pytest_twisted.ensureDeferred
async def test_a_reload_reads_the_dropins_again(main: Path, tmp_path: Path) -> None:
    applied: list[Any] = []
    live = LiveConfig(str(main), {}, str(tmp_path / "data"), apply=applied.append)
    live.start(load_config(str(main), {}))
    dropin(main, "10-new.yaml", "remotes:\n  tools: {type: generic, upstream: 'https://tools.example'}\n")
    assert await live.reload()
    assert "tools" in applied[-1].remotes and live.origin("tools") == "file"
    # an invalid drop-in is refused like an invalid file: the running config stays
    dropin(main, "20-bad.yaml", "remotes:\n  more: {type: generic}\n")
    assert not await live.reload()
    assert len(applied) == 1
