"""Smoke tests proving the testbed from Python: each real runtime pulls a test image from the
local registry and runs a command in it as the unprivileged user (and as root); Slurm runs a
two-node job whose final state comes from sacct."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import BUSYBOX, RUNTIME_PARAMS, nsdf_root, nsdf_user

pytestmark = [pytest.mark.integration, pytest.mark.registry]


@pytest.mark.unprivileged
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_pull_and_run_as_unprivileged_user(runtime: str, as_user, user_dir: Path) -> None:
    cache = user_dir / "cache"
    pulled = nsdf_user(as_user, ["pull", "--runtime", runtime, BUSYBOX], cache)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.startswith("pulled:"), pulled.stdout
    ran = nsdf_user(as_user, ["run", "--runtime", runtime, BUSYBOX, "--", "sh", "-c",
                              "cat /etc/hello.txt; id -u"], cache, cwd=str(user_dir))
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["hello from busybox image", str(as_user.pw.pw_uid)]


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_pull_and_run_as_root(runtime: str, tmp_path: Path) -> None:
    pulled = nsdf_root(["pull", "--runtime", runtime, BUSYBOX], tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    ran = nsdf_root(["run", "--runtime", runtime, BUSYBOX, "--", "sh", "-c",
                     "cat /etc/hello.txt; id -u"], tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["hello from busybox image", "0"]


@pytest.mark.slurm
def test_two_node_job_completes_in_sacct(tmp_path: Path) -> None:
    out = tmp_path / "two.out"
    os.chmod(tmp_path, 0o755)
    script = tmp_path / "two.sbatch"
    script.write_text("#!/bin/bash\nsrun sh -c 'echo node=$SLURM_NODEID'\n")
    sub = subprocess.run(["sbatch", "--parsable", "-N2", "--ntasks-per-node=1", "-o", str(out),
                          str(script)], capture_output=True, text=True, check=True)
    job = sub.stdout.strip().split(";")[0]
    state = ""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State,ExitCode,NNodes", "-j", job],
                              capture_output=True, text=True)
        fields = acct.stdout.strip().split("|")
        state = fields[0] if fields and fields[0] else ""
        if state and state not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            break
        time.sleep(0.5)
    assert state == "COMPLETED", acct.stdout + acct.stderr
    assert fields[1:] == ["0:0", "2"]
    assert sorted(out.read_text().split()) == ["node=0", "node=1"]
