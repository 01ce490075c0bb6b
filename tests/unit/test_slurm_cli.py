"""The Slurm commands are registered on nsdf-run, and Client.job_spec builds valid specs (pure)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from click.testing import CliRunner

from nsdf_hpc.cli import cli
from nsdf_hpc.cli import slurm as cli_slurm
from nsdf_hpc.client import Client
from nsdf_hpc.errors import SpecError
from nsdf_hpc.schedulers.spec import ArraySpec
from nsdf_hpc.schedulers.states import JobState


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


class _FakeStatus:
    def __init__(self, job_id: str) -> None:
        self.job_id, self.exit_code, self.signal, self.reason, self.accounting = job_id, 0, None, None, True
        self.native_state = "COMPLETED"
        self.state = JobState.COMPLETED

    def model_dump_json(self) -> str:
        return json.dumps({"job_id": self.job_id, "state": self.state.value})


class _FakeJob:
    def __init__(self, job_id: str) -> None:
        self.job_ids, self.tasks = (job_id,), {}

    def _update(self, table: object) -> _FakeStatus:
        return _FakeStatus(self.job_ids[0])

    def log_path(self, stream: str, task: object) -> str:
        return "/dev/null"

    def logs(self, stream: str, tail: object, task: object) -> str:
        return f"log of {self.job_ids[0]}\n"


class _FakeSlurm:
    backend = "commands"

    def __init__(self) -> None:
        self.calls: List[Tuple[str, object]] = []

    def attach(self, job_id: str) -> _FakeJob:
        self.calls.append(("attach", job_id))
        return _FakeJob(job_id)

    def status(self, ids: List[str]) -> Dict[str, object]:
        return {}

    def cancel(self, ids: List[str]) -> None:
        self.calls.append(("cancel", list(ids)))


@pytest.fixture
def fake_slurm(monkeypatch: pytest.MonkeyPatch) -> _FakeSlurm:
    fake = _FakeSlurm()
    monkeypatch.setattr(cli_slurm, "_slurm", lambda ctx, *a, **k: (None, fake))
    monkeypatch.setattr(cli_slurm, "_remember", lambda client, slurm: None)
    return fake


def test_array_task_ids_are_accepted(fake_slurm: _FakeSlurm) -> None:
    """Issue 14: Slurm prints array tasks as N_M; status, logs and cancel take them."""
    res = CliRunner().invoke(cli, ["status", "1349_10", "1350"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].split("\t")[:2] == ["1349_10", "COMPLETED"]
    res = CliRunner().invoke(cli, ["status", "--json", "1349_10", "1350"], catch_exceptions=False)
    assert [r["job_id"] for r in json.loads(res.output)] == ["1349_10", "1350"]   # one array
    assert {r["backend"] for r in json.loads(res.output)} == {"commands"}   # which backend answered
    res = CliRunner().invoke(cli, ["logs", "1349_10"], catch_exceptions=False)
    assert res.exit_code == 0 and res.output == "log of 1349_10\n"
    res = CliRunner().invoke(cli, ["cancel", "1349_10", "7"], catch_exceptions=False)
    assert res.exit_code == 0 and ("cancel", ["1349_10", "7"]) in fake_slurm.calls


@pytest.mark.parametrize("command", ["status", "logs", "cancel"])
@pytest.mark.parametrize("job_id", ["abc", "12_", "_3", "1_2_3", "-1", "12.3", "1349_[1-3]", ""])
def test_malformed_job_ids_are_usage_errors(fake_slurm: _FakeSlurm, command: str, job_id: str) -> None:
    res = CliRunner().invoke(cli, [command, "--", job_id])
    assert res.exit_code == 2, res.output
    assert "invalid job id" in res.output and fake_slurm.calls == []


def test_status_help_says_json_is_an_array() -> None:
    out = CliRunner().invoke(cli, ["status", "--help"], catch_exceptions=False).output
    assert "JSON array" in " ".join(out.split()) and "N_M" in out
