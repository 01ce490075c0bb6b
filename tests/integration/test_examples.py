"""The examples are part of the documentation: they must run, for real, on the testbed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import root_env

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
pytestmark = [pytest.mark.integration, pytest.mark.registry]


@pytest.mark.parametrize("runtime", ["apptainer", "udocker"])
def test_quickstart(runtime: str, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--runtime", runtime],
                       env=root_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"using {runtime} (asked for explicitly)" in r.stdout
    assert "hello from a container\ntask=quickstart\nexit code 0" in r.stdout


def test_quickstart_dry_run_runs_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--dry-run"],
                       env=root_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "would run:" in r.stdout and "hello from a container\n" not in r.stdout
    assert not list(tmp_path.rglob("entry.json")), "a dry run converts nothing"
