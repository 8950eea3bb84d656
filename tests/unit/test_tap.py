"""``twistd sparkcache`` options: a configuration error is one line, not twistd's usage text."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from sparkcache.tap import ConfigExit, Options


def test_valid_config_is_parsed(tmp_path: Path) -> None:
    cfg = tmp_path / "cache.yaml"
    cfg.write_text("server:\n  listen: ['tcp:0:interface=127.0.0.1']\nstorage:\n  data_dir: ./data\n")
    opts = Options()
    opts.parseOptions(["-c", str(cfg), "--listen", "tcp:0:interface=::1"])
    assert opts["parsed"].server.listen == ("tcp:0:interface=::1",)


def test_config_error_exits_1_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("storage:\n  max_size: lots\n")
    with pytest.raises(ConfigExit) as info:
        Options().parseOptions(["-c", str(cfg)])
    # SystemExit with a string: the interpreter prints it to stderr and exits 1;
    # twistd only prints its usage text for a usage.UsageError.
    assert not isinstance(info.value, usage.UsageError)
    assert isinstance(info.value, SystemExit)
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"configuration error: {cfg}: storage.max_size: ")


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigExit) as info:
        Options().parseOptions(["-c", str(missing)])
    assert info.value.code == f"configuration error: {missing}: cannot read: No such file or directory"


def test_command_line_mistakes_still_get_usage() -> None:
    # A wrong flag is a command-line problem: twistd's usage text helps there.
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--no-such-flag"])
