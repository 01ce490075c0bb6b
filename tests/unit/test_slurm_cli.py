"""The Slurm commands are registered on nsdf-run, and Client.job_spec builds valid specs (pure)."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from nsdf_hpc.cli import cli
from nsdf_hpc.client import Client
from nsdf_hpc.errors import SpecError
from nsdf_hpc.schedulers.spec import ArraySpec


@pytest.fixture
def client(tmp_path: Path) -> Client:
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "NSDF_HPC_SITE_CONFIG": "/nonexistent",
           "NSDF_HPC_CACHE": str(tmp_path / "cache")}
    return Client(env=env)


@pytest.mark.parametrize("name", ["submit", "status", "cancel", "logs"])
def test_slurm_commands_are_registered(name: str) -> None:
    res = CliRunner().invoke(cli, [name, "--help"], catch_exceptions=False)
    assert res.exit_code == 0 and "Usage:" in res.output


def test_submit_help_uses_sbatch_option_names() -> None:
    out = CliRunner().invoke(cli, ["submit", "--help"], catch_exceptions=False).output
    for opt in ("--nodes", "--ntasks", "--ntasks-per-node", "--cpus-per-task", "--mem", "--gpus",
                "--time", "--partition", "--account", "--qos", "--job-name", "--array",
                "--dependency", "--env", "--bind", "--runtime", "--workdir", "--wait", "--dry-run"):
        assert opt in out


def test_submit_without_a_command_is_a_usage_error() -> None:
    res = CliRunner().invoke(cli, ["submit", "busybox", "--"])
    assert res.exit_code == 2


def test_job_spec_from_client_options(client: Client, tmp_path: Path) -> None:
    class FakeJob:
        job_ids = ("41", "42")
    spec = client.job_spec("busybox", ["echo", "{index}"], binds=[f"{tmp_path}:/data:ro"],
                           env=["A=1", "B=x=y"], array="0-9%2", nodes=2, time="10",
                           dependencies={"afterok": [FakeJob(), "7"]}, mpi="pmi2", workdir="/data")
    assert spec.binds[0].target == "/data" and spec.binds[0].read_only
    assert spec.env == {"A": "1", "B": "x=y"} and spec.workdir == "/data"
    assert spec.array == ArraySpec(indices=tuple(range(10)), throttle=2)
    assert spec.dependencies[0].job_ids == ("41", "42", "7") and spec.mpi == "pmi2"
    assert spec.run_spec().command == ("echo", "{index}")
    per_task = client.job_spec("busybox", None, commands=[["a"], ["b", "c"]])
    assert per_task.array.indices == (0, 1) and per_task.command == ("a",)


def test_job_spec_errors_are_spec_errors(client: Client) -> None:
    with pytest.raises(SpecError):
        client.job_spec("busybox", ["true"], job_name="two\nlines")
    with pytest.raises(SpecError):
        client.job_spec("busybox", ["true"], nodez=2)
    with pytest.raises(SpecError):
        client.job_spec("busybox", None, commands=[["a"]], array="0-4")
    with pytest.raises(SpecError):
        client.submit_array("busybox")


def test_submit_with_slurm_dir_at_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "NSDF_HPC_SITE_CONFIG": "/nonexistent",
           "NSDF_HPC_CACHE": str(tmp_path / "cache"), "NSDF_HPC_SLURM_DIR": "/etc/passwd"}
    res = CliRunner().invoke(cli, ["submit", "-r", "udocker", "busybox", "--", "true"], env=env)
    assert res.exit_code == 2, res.output
    assert "NSDF_HPC_SLURM_DIR=/etc/passwd" in res.output and "Traceback" not in res.output
