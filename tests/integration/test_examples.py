"""The examples are part of the documentation: they must run, for real, on the testbed."""
from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
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


def test_executor_numpy_dry_run_runs_nothing(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / "executor_numpy.py"), "--dry-run"],
                       env=root_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "would run largest_eigenvalue(seed, 400) for seeds 0..3 in nsdf/python:v1.0.0" in r.stdout
    assert not any(tmp_path.iterdir()), "a dry run pulls nothing"


@pytest.mark.slurm
@pytest.mark.apptainer
def test_executor_numpy_on_two_slurm_nodes(shared_cache: Path) -> None:
    """The example as a new user runs it: numpy in nsdf/python:v1.0.0 (built from
    recipes/nsdf-python by the testbed, step recipe-images), pulled by its NSDF name through
    the site's docker.io mirror, one exclusive node per task on the two-node cluster."""
    work = Path("/var/tmp/nsdf-scratch") / f"pytest-example-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        r = subprocess.run([sys.executable, str(EXAMPLES / "executor_numpy.py"), "--runtime", "apptainer",
                            "--items", "4"], env=root_env(shared_cache, NSDF_HPC_SLURM_DIR=str(work)),
                           cwd="/tmp", capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "in nsdf/python:v1.0.0; nodes: c1, c2" in r.stdout, r.stdout
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("item ")]
    assert len(lines) == 4, r.stdout
    mean = float(r.stdout.split("mean largest eigenvalue ")[1].split()[0])
    assert 1.8 < mean < 2.1, r.stdout
