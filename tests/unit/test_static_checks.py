"""Type checking and lint as a habit: mypy (setup.cfg [mypy]: disallow_untyped_defs,
warn_unused_ignores, ...) and ruff (ruff.toml) must pass on the package, in every test run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("statement", ["import nsdf_hpc", "import nsdf_hpc._entry, nsdf_hpc._launch"])
def test_start_up_path_imports_nothing_heavy(statement):
    """`import nsdf_hpc` and the launch fast path (``_entry``, ``_launch``) import neither
    pydantic, click, rich, typing, json, re nor enum (issue 11: the import under 20 ms; a structural check, the
    timing lives in bench/bench_startup.py). -S: the checkout, and no site module that imports
    typing first."""
    code = ("import sys; before = set(sys.modules); " + statement +
            "; print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(ROOT)).stdout.split()
    # json imports re and enum (~12 ms), signal imports enum: the records are marshal data and
    # the launch path uses the built-in _signal
    heavy = [m for m in out if m.split(".")[0] in ("pydantic", "pydantic_core", "click", "rich", "typing", "json",
                                                   "re", "enum", "signal")]
    assert heavy == [], heavy
