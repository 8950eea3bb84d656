"""The wheel, installed as a user would: built from a copy of the checkout,
installed into a fresh virtualenv outside it, and run from a folder that has
no checkout, no PYTHONPATH and no ``etc/`` of its own.

The daemon must come from the venv alone: twistd must find the plugin there
(``twisted/plugins/sparkcache_plugin.py``), and the example configurations
must be where the systemd recipe copies them from (``share/sparkcache/``).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest

from tests.support.daemon import REPO_ROOT, Daemon, DaemonError, free_port
from tests.support.tools import require_tool, run_checked

# Not copied into the build folder: state, caches and what the wheel leaves out.
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "data", "build", "dist", "*.egg-info", "__pycache__", ".mypy_cache", ".pytest_cache",
    "_trial_temp", "dropin.cache", "bench", "tests", "node_modules",
)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: nothing that points Python at the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV") and not k.startswith("SPARKCACHE_")}
    env.update(extra)
    return env


def venv_env(venv: Path) -> dict[str, str]:
    """``clean_env`` without proxies (the daemon talks to 127.0.0.1 only) and the venv first on PATH."""
    env = {k: v for k, v in clean_env().items() if not k.lower().endswith("_proxy")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """The wheel built from a copy of the tree, installed into a fresh venv.

    Built once per test session: xdist may spread this module's tests over
    several workers, and the first one to take the lock builds for all."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, common to every worker
    root = shared / "wheel-install"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            # A failed build fails every test of the module with its message, once.
            if (root / "failed").exists():
                pytest.fail((root / "failed").read_text(), pytrace=False)
            if not (root / "installed").exists():
                try:
                    build_and_install(root)
                except AssertionError as e:
                    (root / "failed").write_text(str(e))
                    raise
                (root / "installed").touch()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    venv = root / "venv"
    yield SimpleNamespace(root=root, wheel=next((root / "dist").glob("sparkcache-*.whl")), venv=venv,
                          python=venv / "bin" / "python", twistd=venv / "bin" / "twistd",
                          share=venv / "share" / "sparkcache")


def build_and_install(root: Path) -> None:
    src, dist, venv = root / "src", root / "dist", root / "venv"
    for stale in (src, dist, venv):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.copytree(REPO_ROOT, src, ignore=_NOT_SOURCES, symlinks=True)
    # Build isolation, as a user's `pip wheel .` does: pyproject.toml's
    # build-system requirements come from the configured index.
    run_checked([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)],
                cwd=root, env=clean_env(), timeout=300)
    wheels = list(dist.glob("sparkcache-*.whl"))
    assert len(wheels) == 1, wheels
    # A venv without pip of its own: this interpreter's pip installs into it
    # (--python), which saves bootstrapping pip and installs the same thing;
    # the dependencies come from the index pip is configured with.
    run_checked([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=clean_env())
    run_checked([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                 str(wheels[0])], cwd=root, env=clean_env(), timeout=300)


def start_installed(d: Daemon, argv: list[str], cwd: Path, env: dict[str, str],
                    preexec_fn: Callable[[], None] | None = None, timeout: float = 60.0) -> Daemon:
    """Start ``argv`` (an installed twistd) as daemon ``d`` and wait for ``/health``;
    a port a parallel test took first is retried on another."""
    for attempt in range(3):
        d.starts += 1
        with open(d.out_path, "ab") as out:
            d.proc = subprocess.Popen([*argv, "--listen", f"tcp:{d.port}:interface=127.0.0.1"], cwd=cwd, env=env,
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                      preexec_fn=preexec_fn)
        try:
            d.wait_ready(timeout)
            return d
        except DaemonError as e:
            if "Address already in use" not in str(e) or attempt == 2:
                raise
            d.port = free_port()
    raise AssertionError("unreachable")


def test_wheel_ships_the_plugin_and_the_examples(installed: SimpleNamespace) -> None:
    site = subprocess.run(
        [str(installed.python), "-c",
         "import sparkcache, twisted.plugins.sparkcache_plugin as p; print(sparkcache.__file__); print(p.__file__)"],
        cwd=installed.root, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert site.returncode == 0, site.stderr
    for path in site.stdout.split():
        # Imported from the venv, not from the checkout.
        assert Path(path).resolve().is_relative_to(installed.venv.resolve()), path
    for name in ("cache.yaml", "service.yaml", "systemd/sparkcache.service", "systemd/sparkcache.socket"):
        assert (installed.share / name).is_file(), name
    assert (installed.share / "cache.yaml").read_text() == (REPO_ROOT / "etc" / "cache.yaml").read_text()
    # The unit's Documentation= points there.
    assert (installed.venv / "share" / "doc" / "sparkcache" / "install.rst").is_file()


def test_installed_twistd_runs_the_service_recipe_from_any_folder(
        installed: SimpleNamespace, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """The recipe in the unit's header, with /opt/sparkcache as the test venv and
    /etc as a tmp folder, then the daemon on the config it installed."""
    require_tool("install")
    unit = (installed.share / "systemd" / "sparkcache.service").read_text()
    recipe = [line[1:].strip() for line in unit.splitlines() if re.match(r"#\s+(/opt/sparkcache/|install )", line)]
    etc = tmp_path / "etc"
    # Whatever twistd wrote before: the recipe's `twistd --help` must write it.
    # (twisted replaces the file by a rename, so a parallel twistd is not hurt.)
    for cache in installed.venv.glob("lib/python*/site-packages/twisted/plugins/dropin.cache"):
        cache.unlink(missing_ok=True)
    for step in recipe:
        if "pip install" in step:
            continue  # done by the fixture, from the wheel it built
        command = step.replace("/opt/sparkcache", str(installed.venv)).replace("/etc/", f"{etc}/")
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, f"{step}\n{proc.stdout}\n{proc.stderr}"
    config = etc / "sparkcache" / "cache.yaml"
    assert config.read_text() == (REPO_ROOT / "etc" / "service.yaml").read_text()
    assert (etc / "systemd" / "system" / "sparkcache.service").is_file()
    # The plugin cache the recipe's `twistd --help` wrote, so a read-only /opt is not written at start.
    assert list(installed.venv.glob("lib/python*/site-packages/twisted/plugins/dropin.cache"))

    # A folder with nothing in it: no checkout, no etc/, no PYTHONPATH.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    d = daemon_factory(start=False)
    start_installed(d, [str(installed.twistd), "-n", "--pidfile=", f"--logfile={d.log_path}", "sparkcache",
                        "-c", str(config), "--data-dir", str(d.data_dir)], cwd, venv_env(installed.venv))
    health = d.get("/health")
    assert health.status == 200 and b'"ok"' in health.body, health.describe()
    assert (d.data_dir).is_dir() and not (cwd / "data").exists()
    # The service config's own listen address is every interface (the test replaced it with --listen).
    loaded = run_checked([str(installed.python), "-c",
                          "import sys; from sparkcache.protocols import load_config;"
                          "print(load_config(sys.argv[1], {}).server.listen)", str(config)],
                         cwd=cwd, env=venv_env(installed.venv))
    assert loaded.stdout.strip() == "('tcp:8090',)"
    assert d.stop() == 0


def test_bundled_example_starts_from_the_venv(
        installed: SimpleNamespace, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory(start=False)
    start_installed(d, [str(installed.twistd), "-n", "--pidfile=", f"--logfile={d.log_path}", "sparkcache",
                        "-c", str(installed.share / "cache.yaml"), "--data-dir", str(d.data_dir)],
                    tmp_path, venv_env(installed.venv))
    root = d.get("/")
    assert root.status == 200 and b"github" in root.body, root.describe()
    d.signal(signal.SIGTERM)
    assert d.wait_exit() == 0


def test_config_error_is_one_line_and_exit_1(installed: SimpleNamespace, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("storage:\n  max_size: lots\n")
    proc = subprocess.run([str(installed.twistd), "-n", "--pidfile=", "sparkcache", "-c", "bad.yaml"], cwd=tmp_path,
                          env=venv_env(installed.venv), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    # No usage text on either stream: only the line that matters.
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("configuration error: bad.yaml: storage.max_size: expected a size"), proc.stderr


def test_console_script(installed: SimpleNamespace, tmp_path: Path) -> None:
    script = shutil.which("sparkcache", path=str(installed.venv / "bin"))
    assert script is not None, "the wheel installs no sparkcache console script (setup.cfg console_scripts)"
    proc = subprocess.run([script, "--help"], env=venv_env(installed.venv), capture_output=True, text=True,
                          timeout=60, cwd=installed.root)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
    # config check works from the installed package alone, with twistd's message
    (tmp_path / "bad.yaml").write_text("storage: {max_size: lots}\n")
    proc = subprocess.run([script, "config", "check", "bad.yaml"], env=venv_env(installed.venv), capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and "storage.max_size" in proc.stderr, (proc.stdout, proc.stderr)
