"""``nsdf-run status N``: the fast path (``_status.py``) prints exactly what the click command
prints from the same sacct answer, or leaves the job to it; and it trusts only the Slurm
settings the click command validated, in the same place and with the same files and variables.
The real cluster: ``tests/integration/test_slurm_jobs.py``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from nsdf_hpc import _status
from nsdf_hpc._exec import CompletedCommand
from nsdf_hpc._slurm_text import status_row
from nsdf_hpc.config import SlurmSettings
from nsdf_hpc.schedulers.slurm import Slurm


class SacctRunner:
    """Answers every sacct call with one recorded text."""

    def __init__(self, out: str) -> None:
        self.out = out

    def run(self, argv: Sequence[str], **kw: object) -> CompletedCommand:
        assert argv[0] == "sacct", argv
        return CompletedCommand(tuple(argv), 0, self.out, "")


def click_rows(out: str, ids: Sequence[str], work_dir: Path) -> List[str]:
    """What the click command prints (``cli/slurm.py status``), from the models."""
    slurm = Slurm(SacctRunner(out), SlurmSettings(work_dir=str(work_dir)))
    jobs = [slurm.attach(j) for j in ids]
    table = slurm.status([i for j in jobs for i in j.job_ids])
    return [status_row(r.job_id, r.state, r.native_state, r.exit_code, r.signal, r.reason, r.accounting)
            for r in (j._update(table) for j in jobs)]


PLAIN = {
    "done": "11|COMPLETED|0:0|None|c1|x\n",
    "failed": "12|FAILED|3:0|None|c1|a|b\n",         # a JobName with the delimiter
    "signal": "13|CANCELLED by 0|0:15|None|c1|x\n",
    "timeout": "14|TIMEOUT|0:0|TimeLimit|c1|x\n",
    "node fail": "15|NODE_FAIL|0:0|None|c1|x\n",
    "pending": "16|PENDING|0:0|Priority|None assigned|x\n",
    "running": "17|RUNNING|0:0|None|c2|x\n",
    "ended, a pending reason left": "18|COMPLETED|0:0|JobArrayTaskLimit|c1|x\n",
    "oom with its code": "19|OUT_OF_MEMORY|137:0|None|c1|x\n",
    "odd word": "20|SOMETHING_NEW|0:0|None|c1|x\n",
}


@pytest.mark.parametrize("case", list(PLAIN))
def test_a_plain_job_is_printed_as_the_click_command_prints_it(case: str, tmp_path: Path) -> None:
    out = PLAIN[case]
    jid = out.split("|", 1)[0]
    rows = _status.status_rows([jid], out)
    assert rows is not None and rows == click_rows(out, [jid], tmp_path)


def test_many_jobs_in_one_answer_and_a_repeated_id(tmp_path: Path) -> None:
    out = "".join(PLAIN.values())
    ids = ["17", "11", "12", "11"]
    rows = _status.status_rows(ids, out)
    assert rows == click_rows(out, ids, tmp_path) and len(rows) == 4


LEFT_TO_CLICK = {
    "array tasks": (["30"], "30_0|COMPLETED|0:0|None|c1|x\n30_[1-3]|PENDING|0:0|None|None assigned|x\n"),
    "not listed yet": (["31"], "11|COMPLETED|0:0|None|c1|x\n"),
    "a line slurmdbd has not completed": (["32"], "32|FAILED|0:0|None|c1|x\n"),
    "an OOM kill (the exit-code file)": (["33"], "33|OUT_OF_MEMORY|0:125|None|c1|x\n"),
    "one of two missing": (["11", "34"], "11|COMPLETED|0:0|None|c1|x\n"),
}


@pytest.mark.parametrize("case", list(LEFT_TO_CLICK))
def test_anything_but_a_plain_job_is_left_to_the_click_command(case: str) -> None:
    ids, out = LEFT_TO_CLICK[case]
    assert _status.status_rows(ids, out) is None


def test_unexpected_sacct_output_is_left_to_the_click_command(tmp_path: Path) -> None:
    assert _status.fast_status(["status", "1"], {"HOME": str(tmp_path)}) is None   # no stamp
    with pytest.raises(Exception):
        _status.status_rows(["1"], "garbage\n")


@pytest.mark.parametrize("args", [["status"], ["status", "1_2"], ["status", "--json", "1"],
                                  ["status", "1", "--tasks"], ["status", "١"], ["cancel", "1"]])
def test_only_bare_job_ids_take_the_fast_path(args: List[str], tmp_path: Path) -> None:
    env = _remembered(tmp_path)
    assert _status._settings(env) is not None
    assert _status.fast_status(args, env) is None


# ------------------------------------------------------------------ provenance (Slurm.attach)

def _job_dir(work_dir: Path, job_id: str, prov: object) -> None:
    d = work_dir / "jobs" / f"job-{job_id}"
    d.mkdir(parents=True)
    (d / "provenance.json").write_text(json.dumps(prov))
    (work_dir / "by-id").mkdir(exist_ok=True)
    os.symlink(d, work_dir / "by-id" / job_id)


@pytest.mark.parametrize("prov, plain", [
    ({"job_ids": ["40"], "array": False}, True),
    ({"job_ids": ["40"], "array": True, "indices": [0, 1]}, False),
    ({"job_ids": ["40", "41"], "array": True}, False),          # split over two sbatch calls
    ({"job_ids": ["40", "41"]}, False),
    ("not a mapping", True),
    (None, True),
])
def test_a_job_nsdf_hpc_submitted_as_an_array_is_left_to_the_click_command(
        prov: object, plain: bool, tmp_path: Path) -> None:
    if prov is not None:
        _job_dir(tmp_path, "40", prov)
    assert _status._plain_job(str(tmp_path), "40") is plain


# ------------------------------------------------------------------ the remembered settings

def _remembered(tmp_path: Path, accounting: str = "auto", backend: str = "commands",
                chosen: str = "commands", follows_cwd: bool = False,
                env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = env or {"HOME": str(tmp_path / "home"), "NSDF_HPC_CONFIG": str(tmp_path / "user.toml"),
                  "NSDF_HPC_SITE_CONFIG": str(tmp_path / "site.toml")}
    Path(env["NSDF_HPC_CONFIG"]).write_text('[slurm]\nwork_dir = "$SCRATCH/jobs"\n') \
        if not Path(env["NSDF_HPC_CONFIG"]).exists() else None
    _status.remember_slurm(env, str(tmp_path / "jobs"), accounting, backend, chosen, 60.0, follows_cwd)
    return env


def test_the_settings_hold_while_nothing_they_were_made_from_changed(tmp_path: Path) -> None:
    env = _remembered(tmp_path)
    conf = _status._settings(env)
    assert conf is not None and conf["work_dir"] == str(tmp_path / "jobs")
    assert conf["command_timeout"] == 60.0
    changed = [
        {**env, "NSDF_HPC_SLURM_ACCOUNTING": "none"},
        {**env, "NSDF_HPC_SLURM_BACKEND": "rest"},
        {**env, "SCRATCH": "/elsewhere"},                   # named by the config file
        {**env, "HOME": str(tmp_path / "other-home")},     # another user's home: no stamp there
    ]
    for e in changed:
        assert _status._settings(e) is None, e
    Path(env["NSDF_HPC_CONFIG"]).write_text('[slurm]\nwork_dir = "/other"\n')
    assert _status._settings(env) is None
    Path(env["NSDF_HPC_SITE_CONFIG"]).write_text("")
    assert _status._settings(_remembered(tmp_path, env=env)) is not None


@pytest.mark.parametrize("accounting, backend, chosen", [
    ("none", "auto", "commands"), ("auto", "rest", "rest"), ("auto", "pyslurm", "pyslurm"),
    ("auto", "auto", "pyslurm")])
def test_only_sacct_through_the_command_backend_is_remembered(accounting: str, backend: str,
                                                              chosen: str, tmp_path: Path) -> None:
    assert _status._settings(_remembered(tmp_path, accounting, backend, chosen)) is None


def test_with_backend_auto_an_importable_pyslurm_leaves_it_to_the_click_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = _remembered(tmp_path, backend="auto")
    assert _status._settings(env) is not None
    (tmp_path / "site-packages" / "pyslurm").mkdir(parents=True)
    (tmp_path / "site-packages" / "pyslurm" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    assert _status._settings(env) is None


def test_a_relative_work_dir_holds_only_in_the_directory_it_was_made_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    env = _remembered(tmp_path, follows_cwd=True)
    assert _status._settings(env) is not None
    monkeypatch.chdir(tmp_path / "b")
    assert _status._settings(env) is None


@pytest.mark.parametrize("where, raw, follows", [
    ("env:NSDF_HPC_SLURM_DIR", "jobs", True), ("env:NSDF_HPC_SLURM_DIR", "~/jobs", False),
    ("env:NSDF_HPC_SLURM_DIR", "$HOME/jobs", False), ("config", "rel/jobs", True),
    ("config", "/abs/jobs", False), ("default", None, False), ("argument", "/abs", True)])
def test_which_work_dirs_follow_the_current_directory(where: str, raw: Optional[str], follows: bool,
                                                       tmp_path: Path) -> None:
    from nsdf_hpc.config import work_dir_follows_cwd
    env = {"HOME": "/home/u", "SCRATCH": "/scratch/u"}
    if where == "config":
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[slurm]\nwork_dir = "{raw}"\n')
        where = f"config:{cfg}"
    elif where.startswith("env:"):
        env["NSDF_HPC_SLURM_DIR"] = str(raw)
    sources = {} if where == "default" else {"work_dir": where}
    settings = SlurmSettings(work_dir="/x", sources=sources)
    assert work_dir_follows_cwd(settings, env) is follows


def test_a_relative_work_dir_in_a_removed_directory_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found using it: `NSDF_HPC_SLURM_DIR=jobs nsdf-run status 1` in a directory that was
    removed ended with a FileNotFoundError traceback."""
    from nsdf_hpc.config import load_slurm_settings
    from nsdf_hpc.errors import ConfigError
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    env = {"HOME": str(tmp_path), "NSDF_HPC_SLURM_DIR": "jobs"}
    with pytest.raises(ConfigError, match=r"work_dir 'jobs' \(from env:NSDF_HPC_SLURM_DIR\) is relative"):
        load_slurm_settings(env, files=[])
    assert load_slurm_settings({**env, "NSDF_HPC_SLURM_DIR": "/abs/jobs"}, files=[]).work_dir == "/abs/jobs"
