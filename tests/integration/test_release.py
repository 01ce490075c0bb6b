"""Releases (issue 10 item 7): `python -m build` makes the sdist and the wheel; two builds of
one commit are byte-identical; `twine check` passes; the version is written in one place; and
the wheel, installed in a clean venv, runs the README's main command.

The two builds start from two copies of the files git tracks (or would: untracked files that
are not ignored count too) that differ in every mtime and mode, as two checkouts of the same
commit made at different times by different umasks would.
The builds need `build` and `twine` (the `test` extra) and PyPI for the isolated build
environment (setuptools, pinned in pyproject.toml); the last test needs the testbed: the
README's `busybox` comes through the site config's docker.io mirror.
"""
from __future__ import annotations

import configparser
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest

from nsdf_hpc._version import __version__

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
#: used only when the tree is not a git checkout
FALLBACK_EPOCH = "1700000000"


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"{module} is not installed for {sys.executable}: pip install '.[test]'",
                    pytrace=False)


def _tracked_files() -> List[str]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                              "--exclude-standard"], capture_output=True,
                             check=True).stdout.decode()
        return [p for p in out.split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "build", "dist", "__pycache__", ".venv"}
        return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
                and not any(part.endswith(".egg-info") for part in p.parts)]


def _epoch() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return out or FALLBACK_EPOCH
    except (OSError, subprocess.CalledProcessError):
        return FALLBACK_EPOCH


def _checkout(dest: Path, files: List[str], mtime: float, mode: int) -> Path:
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, target)
        os.chmod(target, mode | (0o111 if os.access(ROOT / rel, os.X_OK) else 0))
        os.utime(target, (mtime, mtime))
    return dest


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Dict[str, Path]]:
    """Two `python -m build` runs from two differently stamped copies: {"a"|"b": {name: path}}."""
    _require("build")
    files = _tracked_files()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env["SOURCE_DATE_EPOCH"] = _epoch()
    result: Dict[str, Dict[str, Path]] = {}
    for label, mtime, mode in (("a", 1_000_000_000.0, 0o644), ("b", 1_900_000_000.5, 0o600)):
        base = tmp_path_factory.mktemp(f"release-{label}")
        src = _checkout(base / "src", files, mtime, mode)
        out = base / "dist"
        built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
                               env=env, capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        result[label] = {p.name: p for p in sorted(out.iterdir())}
    return result


def test_build_makes_an_sdist_and_a_wheel(builds: Dict[str, Dict[str, Path]]) -> None:
    assert sorted(builds["a"]) == [f"nsdf_hpc-{__version__}-py3-none-any.whl",
                                   f"nsdf_hpc-{__version__}.tar.gz"]
    wheel = zipfile.ZipFile(builds["a"][f"nsdf_hpc-{__version__}-py3-none-any.whl"])
    names = wheel.namelist()
    assert "nsdf_hpc/py.typed" in names and "nsdf_hpc/_version.py" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "release/"))], names
    entry_points = wheel.read(f"nsdf_hpc-{__version__}.dist-info/entry_points.txt").decode()
    assert "nsdf-run = nsdf_hpc._entry:main" in entry_points


def test_two_builds_of_one_commit_are_byte_identical(builds: Dict[str, Dict[str, Path]]) -> None:
    hashes = {label: {name: _sha256(path) for name, path in dist.items()}
              for label, dist in builds.items()}
    for name, digest in hashes["a"].items():
        print(f"sha256 {digest}  {name}  (SOURCE_DATE_EPOCH={_epoch()})")
    assert hashes["a"] == hashes["b"]


def test_twine_check_passes(builds: Dict[str, Dict[str, Path]]) -> None:
    _require("twine")
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict",
                              *map(str, builds["a"].values())],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout


def test_the_version_is_written_in_one_place(builds: Dict[str, Dict[str, Path]]) -> None:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: nsdf_hpc._version.__version__"
    written = [str(p.relative_to(ROOT)) for p in (ROOT / "nsdf_hpc").rglob("*.py")
               if re.search(r"^__version__\s*=", p.read_text(), re.M)]
    assert written == ["nsdf_hpc/_version.py"]
    wheel = zipfile.ZipFile(builds["a"][f"nsdf_hpc-{__version__}-py3-none-any.whl"])
    metadata = wheel.read(f"nsdf_hpc-{__version__}.dist-info/METADATA").decode()
    assert f"\nVersion: {__version__}\n" in metadata
    assert re.search(rf"^## {re.escape(__version__)}\b", (ROOT / "CHANGELOG.md").read_text(), re.M), \
        f"CHANGELOG.md has no '## {__version__}' section"


def _readme_main_command() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    marker = next(i for i, line in enumerate(lines) if line.startswith("# main:"))
    return lines[marker + 1]


@pytest.mark.integration
@pytest.mark.registry
def test_the_wheel_in_a_clean_venv_runs_the_readme_main_command(
        builds: Dict[str, Dict[str, Path]], tmp_path: Path) -> None:
    install, _, command = _readme_main_command().partition(" && ")
    assert install == "pip install .", f"the README's main command changed: {install!r}"
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    venv = tmp_path / "venv"
    # nothing of this checkout may leak in: no PYTHONPATH (pip would take the checkout's
    # nsdf_hpc for an installed one and skip the wheel), no active venv, no NSDF_HPC_*
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NSDF_HPC_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    subprocess.run([python, "-m", "venv", str(venv)], env=env, check=True, timeout=120)
    wheel = builds["a"][f"nsdf_hpc-{__version__}-py3-none-any.whl"]
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                                str(wheel)], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                               timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env["NSDF_HPC_CACHE"] = str(tmp_path / "cache")
    version = subprocess.run(["nsdf-run", "--version"], env=env, capture_output=True, text=True,
                             timeout=60)
    assert version.stdout.strip() == f"nsdf-run, version {__version__}", version.stdout + version.stderr
    where = subprocess.run(["sh", "-c", "command -v nsdf-run"], env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(venv / "bin" / "nsdf-run"), env["PATH"] + where.stderr
    ran = subprocess.run(["bash", "-c", command], env=env, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout == "hello from a container\n", ran.stdout + ran.stderr
