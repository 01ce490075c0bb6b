"""Type checking and lint as a habit: mypy (setup.cfg [mypy]: disallow_untyped_defs,
warn_unused_ignores, ...) and ruff (ruff.toml) must pass on the package, in every test run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_mypy_passes_on_the_package() -> None:
    r = _run("mypy", "--config-file", str(ROOT / "setup.cfg"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_passes() -> None:
    r = _run("ruff", "check", "nsdf_hpc", "tests", "bench", "examples")
    assert r.returncode == 0, r.stdout + r.stderr
