"""Batch script rendering with hostile values (pure, plus bash running the rendered rank
function against a fake "runtime" that records its argv and environment; no Slurm)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from pydantic import ValidationError

from nsdf_hpc.environment import EnvEncoding
from nsdf_hpc.errors import SpecError
from nsdf_hpc.schedulers.spec import ArraySpec, Dependency, JobSpec
from nsdf_hpc.schedulers.script import (JOB_TIME_PATTERNS, ScriptInputs, directives, forwarding_templates,
                                        render_script, sbatch_quote)

HOSTILE = [
    "plain", "with space", "quote'd", 'dq"x', "semi;colon", "new\nline", "$(touch {marker})",
    "`touch {marker}`", "${HOME}", "back\\slash", "ünïcødé ✓", "#hash", "*glob?", "-dash", "",
    "a=b,c", "tab\there", "'", '"', "\\", "%j %A",
]

# what a runtime recorded by the fake: argv and environment, as JSON
RECORDER = ("import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, "
            "open(os.environ['REC_OUT'], 'w'))")


def sbatch_parse(line: str) -> List[str]:
    """Slurm 22.05's ``_get_argument`` loop (src/sbatch/opt.c), for one #SBATCH line."""
    body = line[len("#SBATCH"):]
    args, i = [], 0
    while True:
        while i < len(body) and body[i].isspace():
            i += 1
        if i >= len(body):
            return args
        arg, quoted, q, esc = [], False, "", False
        while i < len(body) and (quoted or not body[i].isspace()) and body[i] != "\n":
            c = body[i]
            if esc:
                esc = False
            elif c == "\\":
                esc = True
                i += 1
                continue
            elif quoted:
                if c == q:
                    quoted = False
                    i += 1
                    continue
            elif c in "\"'":
                quoted, q = True, c
                i += 1
                continue
            elif c == "#":
                return args + (["".join(arg)] if arg else [])
            arg.append(c)
            i += 1
        args.append("".join(arg))


def spec(**kw: object) -> JobSpec:
    base = dict(image="busybox", command=("echo", "hi"), job_name="job")
    base.update(kw)
    return JobSpec(**base)  # type: ignore[arg-type]


def inputs(tmp_path: Path, **kw: object) -> ScriptInputs:
    base = dict(prefix=(sys.executable, "-c", RECORDER, "RUNTIME-ARGS"),
                fixed_env={"PATH": os.environ["PATH"], "REC_OUT": str(tmp_path / "rec.json"),
                           "RTENV_FIXED": "x y"},
                job_dir=str(tmp_path / "job dir"), script_path=str(tmp_path / "job dir" / "job.sh"),
                chdir=str(tmp_path), fwd_env=("RTENV_NSDFPROBEVARNAME=NSDFPROBEVARVALUE",),
                fwd_args=("--env=NSDFPROBEVARNAME=NSDFPROBEVARVALUE",), fwd_index=4,
                forward=JOB_TIME_PATTERNS, deny=("PYTHONPATH", "SLURM_SECRET*"),
                output=str(tmp_path / "o %j.out"), error=str(tmp_path / "e.err"))
    base.update(kw)
    return ScriptInputs(**base)  # type: ignore[arg-type]


def run_rank(script: str, tmp_path: Path, **env: str) -> dict:
    path = tmp_path / "job dir" / "job.sh"
    path.parent.mkdir(exist_ok=True)
    path.write_text(script)
    penv = {"PATH": os.environ["PATH"], **env}
    subprocess.run(["/bin/bash", str(path), "--nsdf-rank"], env=penv, check=True, cwd=tmp_path,
                   timeout=30)
    return json.loads((tmp_path / "rec.json").read_text())


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v)[:20])
def test_hostile_command_and_env_round_trip_and_run_nothing(value: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    value = value.replace("{marker}", str(marker))
    s = spec(command=("printf", "%s", value, "$X"), env={"X": value} if "\0" not in value else {})
    script = render_script(s, inputs(tmp_path))
    subprocess.run(["/bin/bash", "-n"], input=script, text=True, check=True)
    rec = run_rank(script, tmp_path, SLURM_PROCID="3", SLURM_SECRET_TOKEN="no", PYTHONPATH="no",
                   SLURM_JOB_NAME=value, NOT_FORWARDED="no")
    assert rec["argv"][:1] == ["RUNTIME-ARGS"]
    assert rec["argv"][-4:] == ["printf", "%s", value, "$X"]
    # per-rank Slurm variables reach the runtime in both forms the probe found
    assert "--env=SLURM_PROCID=3" in rec["argv"] and rec["env"]["RTENV_SLURM_PROCID"] == "3"
    assert f"--env=SLURM_JOB_NAME={value}" in rec["argv"]
    # the clean contract: nothing else from the rank's environment
    assert "NOT_FORWARDED" not in rec["env"] and "RTENV_PYTHONPATH" not in rec["env"]
    assert not any("SLURM_SECRET" in a for a in rec["argv"])
    assert rec["env"]["RTENV_FIXED"] == "x y"
    assert not marker.exists()


@pytest.mark.parametrize("value", [v for v in HOSTILE if "\n" not in v and "\t" not in v and v],
                         ids=lambda v: repr(v)[:20])
def test_sbatch_directives_round_trip_through_sbatchs_parser(value: str, tmp_path: Path) -> None:
    s = spec(job_name=value, account=value, extra_directives=(f"--comment={value}",))
    lines = directives(s, inputs(tmp_path))
    parsed = [sbatch_parse(x) for x in lines]
    assert all(len(p) == 1 for p in parsed), parsed
    flat = [p[0] for p in parsed]
    assert f"--job-name={value}" in flat and f"--account={value}" in flat
    assert f"--comment={value}" in flat
    assert "--export=NIL" in flat


def test_shlex_quote_is_not_safe_for_sbatch_but_ours_is() -> None:
    import shlex
    assert sbatch_parse("#SBATCH --job-name=" + shlex.quote("a\\b")) == ["--job-name=ab"]
    assert sbatch_parse("#SBATCH --job-name=" + sbatch_quote("a\\b")) == ["--job-name=a\\b"]
    with pytest.raises(SpecError):
        sbatch_quote("new\nline")


@pytest.mark.parametrize("bad", [{"job_name": "a\nb"}, {"job_name": ""}, {"job_name": "x" * 201},
                                 {"mem": "4 GB"}, {"time": "soon"}, {"mpi": "openmpi"},
                                 {"extra_directives": ("--wrap=ls",)},
                                 {"extra_directives": ("--export=ALL",)},
                                 {"extra_directives": ("no-dash",)}, {"partition": "a\nb"},
                                 {"nodes": 0}])
def test_invalid_job_specs_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        spec(**bad)


def test_directives_cover_the_resources(tmp_path: Path) -> None:
    s = spec(nodes=2, ntasks=4, ntasks_per_node=2, cpus_per_task=3, mem="4G", gpus="a100:1",
             time="1:00:00", partition="debug", account="acct", qos="high", constraint="x&y",
             exclusive=True, dependencies=(Dependency(kind="afterok", job_ids=("1", "2")),
                                           Dependency(kind="afternotok", job_ids=("3",))),
             extra_directives=("--mail-type=END",))
    flat = [sbatch_parse(x)[0] for x in directives(s, inputs(tmp_path), array="0-9%2")]
    for want in ("--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--cpus-per-task=3", "--mem=4G",
                 "--gpus=a100:1", "--time=1:00:00", "--partition=debug", "--account=acct",
                 "--qos=high", "--constraint=x&y", "--exclusive", "--array=0-9%2",
                 "--dependency=afterok:1:2,afternotok:3", "--kill-on-invalid-dep=yes",
                 "--mail-type=END", f"--chdir={tmp_path}"):
        assert want in flat


def test_script_never_wraps_and_records_the_exit_code(tmp_path: Path) -> None:
    script = render_script(spec(), inputs(tmp_path))
    assert "--wrap" not in script
    assert script.startswith("#!/bin/bash\n#SBATCH ")
    assert '"$NSDF_JOB_DIR/exit/$SLURM_JOB_ID"' in script
    assert "( nsdf_rank )" in script and "srun" not in script


def test_mpi_runs_one_container_per_rank_under_srun(tmp_path: Path) -> None:
    script = render_script(spec(nodes=2, mpi="pmix"), inputs(tmp_path))
    line = [x for x in script.splitlines() if x.startswith("srun ")][0]
    assert line.startswith("srun --export=ALL --kill-on-bad-exit=1 --mpi=pmix /bin/bash ")
    assert line.endswith('"$NSDF_SCRIPT" --nsdf-rank')
    assert "srun" in render_script(spec(ntasks=3), inputs(tmp_path))


def test_array_template_and_per_task_commands(tmp_path: Path) -> None:
    s = spec(command=("echo", "task-{index}.dat", "{index}"), array=ArraySpec(indices=(0, 1, 2)))
    script = render_script(s, inputs(tmp_path, array_indices=(0, 1, 2)), array="0-2")
    assert "NSDF_TASK_INDEX=$SLURM_ARRAY_TASK_ID" in script
    rec = run_rank(script, tmp_path, NSDF_TASK_INDEX="2")
    assert rec["argv"][-3:] == ["echo", "task-2.dat", "2"]
    s = spec(commands=(("echo", "zero"), ("echo", "one $(x)")), array=ArraySpec(indices=(5, 9)))
    script = render_script(s, inputs(tmp_path, array_indices=(5, 9)), array="5,9")
    assert run_rank(script, tmp_path, NSDF_TASK_INDEX="9")["argv"][-2:] == ["echo", "one $(x)"]


def test_remapped_array_maps_chunk_ids_back_to_user_indices(tmp_path: Path) -> None:
    s = spec(array=ArraySpec(indices=(10, 20, 30)))
    script = render_script(s, inputs(tmp_path, array_indices=(10, 20, 30), remapped=True), array="0-1")
    assert "NSDF_INDICES=(10 20 30)" in script
    contiguous = render_script(spec(array=ArraySpec(indices=tuple(range(100, 200)))),
                               inputs(tmp_path, array_indices=tuple(range(100, 200)), remapped=True))
    assert "NSDF_TASK_INDEX=$(( 100 + NSDF_OFFSET + SLURM_ARRAY_TASK_ID ))" in contiguous
    assert "NSDF_OFFSET=${1:-${NSDF_ARRAY_OFFSET:-0}}" in contiguous


def test_forwarding_templates_follow_the_runtime_env_encoding() -> None:
    """The same assertions the old argv-diff probing made, now from the one encoding."""
    env_t, args, index = forwarding_templates(EnvEncoding("argv", flag="-e"), 4)
    assert env_t == () and args == ("-e", "NSDFPROBEVARNAME=NSDFPROBEVARVALUE") and index == 4
    env_t, args, _ = forwarding_templates(EnvEncoding("prefix", prefix="APPTAINERENV_"), 3)
    assert env_t == ("APPTAINERENV_NSDFPROBEVARNAME=NSDFPROBEVARVALUE",) and args == ()
    env_t, args, _ = forwarding_templates(EnvEncoding("process"), 3)
    assert env_t == ("NSDFPROBEVARNAME=NSDFPROBEVARVALUE",) and args == ()


@pytest.mark.parametrize("name,bound", [("pmix.7.0 it's \"odd\" $(x)", True), ("has:colon", False),
                                        (None, False)])
def test_each_mpi_rank_binds_its_own_pmix_directory(name: object, bound: bool, tmp_path: Path) -> None:
    """submit(mpi="pmix"): the rank's $PMIX_SERVER_TMPDIR is bound at its own path with the
    runtime's words (found by bind_template), its mount point made first; a value a bind
    cannot carry (':' ',' or not absolute) binds nothing."""
    from nsdf_hpc.schedulers.script import BIND_PROBE
    tree = tmp_path / "tree"
    script = render_script(spec(nodes=2, mpi="pmix"), inputs(
        tmp_path, rank_bind=("--bind", f"{BIND_PROBE}:{BIND_PROBE}"),
        rank_mkdirs=(f"{tree}{BIND_PROBE}",)))
    subprocess.run(["/bin/bash", "-n"], input=script, text=True, check=True)
    env = {"NSDF_RANKS_DIR": str(tmp_path / "ranks"), "SLURM_PROCID": "0"}
    (tmp_path / "ranks").mkdir()
    d = ""
    if name is not None:
        d = str(tmp_path / str(name))
        os.makedirs(d)
        env["PMIX_SERVER_TMPDIR"] = d + "/"
    rec = run_rank(script, tmp_path, **env)
    argv = rec["argv"]
    if bound:
        i = argv.index("--bind")
        assert argv[i + 1] == f"{d}:{d}" and (tree / d.lstrip("/")).is_dir()
    else:
        assert "--bind" not in argv and not tree.exists()


def test_again_is_the_same_job_in_a_new_directory_with_its_own_command_and_tasks(tmp_path) -> None:
    """``submit.again``: what the Executor submits after its first job, with no pull and no
    planning: a new directory, script and provenance of their own; the command quoted as in
    a full preparation; the array's throttle kept; nothing shared with the first job."""
    import hashlib
    from nsdf_hpc.config import SlurmSettings
    from nsdf_hpc.schedulers import submit
    from nsdf_hpc.schedulers.slurm import Slurm

    slurm = Slurm(None, SlurmSettings(work_dir=str(tmp_path)))   # type: ignore[arg-type]
    slurm._max_array = 1001
    spec = JobSpec(image="reg/img@sha256:" + "a" * 64, command=("python3", "w.py", "/g1", "{index}"),
                   array=ArraySpec(indices=(0,), throttle=4), job_name="nsdf-exec", time="0:05")
    inputs = ScriptInputs(prefix=("apptainer", "exec", "/c/img.sif"), fixed_env={"PATH": "/usr/bin"},
                          job_dir="", script_path="", chdir="/home/u", header=("generated by",))
    first = submit._in_job_dir(spec, inputs, {"runtime": "apptainer", "digest": "sha256:" + "a" * 64},
                               str(tmp_path), 1001)
    first.provenance["job_ids"].append("1")        # what sbatch_prepared does to the first
    hostile = "$(touch /tmp/pwned) 'x' \"y\""
    nxt = submit.again(first, slurm, command=["python3", "w.py", "/g 2", hostile, "{index}"], array=3)
    assert nxt.inputs.job_dir != first.inputs.job_dir and nxt.inputs.job_dir.startswith(str(tmp_path))
    assert nxt.inputs.script_path == os.path.join(nxt.inputs.job_dir, "job.sh")
    assert "#SBATCH --array=0-2%4\n" in nxt.script and "#SBATCH --time=0:05\n" in nxt.script
    assert f"#SBATCH --output={nxt.inputs.job_dir}/%A_%a.out\n" in nxt.script
    assert first.inputs.job_dir not in nxt.script
    assert [h for h in nxt.inputs.header if h.startswith("provenance:")] == \
        [f"provenance: {nxt.inputs.job_dir}/provenance.json"]
    # the command as bash reads it back (the task index expands)
    line = next(x for x in nxt.script.splitlines() if x.strip().startswith("NSDF_CMD=("))
    words = subprocess.run(["bash", "-c", f'NSDF_TASK_INDEX=2; {line.strip()}; printf "%s\\n" "${{NSDF_CMD[@]}}"'],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words == ["python3", "w.py", "/g 2", hostile, "2"]
    prov = nxt.provenance
    assert prov["directory"] == nxt.inputs.job_dir and prov["indices"] == [0, 1, 2]
    assert prov["command"] == ["python3", "w.py", "/g 2", hostile, "{index}"]
    assert prov["script_sha256"] == hashlib.sha256(nxt.script.encode()).hexdigest()
    assert prov["job_ids"] == [] and prov["chunks"] == [] and prov["digest"] == "sha256:" + "a" * 64
    assert first.provenance["job_ids"] == ["1"]
    assert json.loads(submit.provenance_text(prov)) == prov
    # a job of one command per task takes no new command or indices
    per_task = submit._in_job_dir(spec.model_copy(update={"commands": (("a",),), "command": ("a",)}),
                                  inputs, {}, str(tmp_path), 1001)
    with pytest.raises(SpecError):
        submit.again(per_task, slurm, command=["b"])
