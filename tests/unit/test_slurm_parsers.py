"""Slurm output parsers, the state table, array splitting and the pyslurm choice (pure).

The recorded outputs below come from the testbed cluster (Slurm 22.05.8, slurmdbd).
"""
from __future__ import annotations

import logging
import math

import pytest

from nsdf_hpc.errors import SpecError, UnexpectedOutputError
from nsdf_hpc.schedulers.commands import (is_transient, parse_exit_code, parse_max_array_size,
                                          parse_sacct, parse_scontrol_jobs, parse_slurm_version,
                                          parse_submit, status_argv)
from nsdf_hpc.schedulers.pyslurm_backend import compatible, pyslurm_version, select_backend
from nsdf_hpc.schedulers.script import split_array
from nsdf_hpc.schedulers.spec import ArraySpec, parse_dependencies
from nsdf_hpc.schedulers.states import SLURM_STATES, JobState, JobStatus, aggregate, slurm_state

SACCT = """\
4|COMPLETED|0:0|None|c[1-2]|it's a $(name) `q` # \\ ü
5|CANCELLED by 0|0:0|None|None assigned|a b
21|FAILED|3:0|None|c1|fail
22|TIMEOUT|0:0|None|c1|slow
23|OUT_OF_MEMORY|0:125|None|c2|oom
30_0|COMPLETED|0:0|None|c1|arr
30_1|FAILED|2:0|None|c2|arr
30_[2-999%10]|PENDING|0:0|JobArrayTaskLimit|None assigned|arr
31|PENDING|0:0|Dependency|None assigned|we|ird
"""

# two real lines (array task and pending array remainder; the job name contains '|' and
# ' UserId=') and a plain job, shortened after Power=
SCONTROL = (
    "JobId=16 ArrayJobId=15 ArrayTaskId=1 ArrayTaskThrottle=2 JobName=we|ird UserId=x name "
    "UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901752 Nice=0 Account=root "
    "QOS=normal JobState=COMPLETED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 "
    "Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=UNLIMITED NodeList=c1 Command=/tmp/q.sh "
    "WorkDir=/tmp StdErr=/tmp/slurm-15_1.out StdIn=/dev/null StdOut=/tmp/slurm-15_1.out Power= \n"
    "JobId=15 ArrayJobId=15 ArrayTaskId=0,2-3%2 ArrayTaskThrottle=2 JobName=we|ird UserId=x name "
    "UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=0 Nice=0 Account=root QOS=normal "
    "JobState=PENDING Reason=JobHeldUser Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 "
    "ExitCode=0:0 RunTime=00:00:00 TimeLimit=UNLIMITED Command=/tmp/q.sh WorkDir=/tmp Power= \n"
    "JobId=12 JobName=it's a $(name) \"q\" # \\ ü UserId=root(0) GroupId=root(0) MCS_label=N/A "
    "Priority=4294901763 Nice=0 Account=root QOS=normal JobState=TIMEOUT Reason=TimeLimit "
    "Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 Power= \n"
)


@pytest.mark.parametrize("raw,code,state", [
    ("COMPLETED", "0:0", JobState.COMPLETED),
    ("FAILED", "3:0", JobState.FAILED),
    ("TIMEOUT", "0:0", JobState.FAILED),          # failures even with exit code 0
    ("OUT_OF_MEMORY", "0:0", JobState.FAILED),
    ("NODE_FAIL", "0:0", JobState.FAILED),
    ("PREEMPTED", "0:0", JobState.FAILED),
    ("BOOT_FAIL", "0:0", JobState.FAILED),
    ("DEADLINE", "0:0", JobState.FAILED),
    ("CANCELLED by 0", "0:15", JobState.CANCELED),
    ("CANCELLED+", "0:0", JobState.CANCELED),
    ("PENDING", "0:0", JobState.QUEUED),
    ("REQUEUED", "0:0", JobState.QUEUED),
    ("RUNNING", "0:0", JobState.ACTIVE),
    ("COMPLETING", "0:0", JobState.ACTIVE),
    ("SUSPENDED", "0:0", JobState.ACTIVE),
    ("TO", "", JobState.FAILED),                   # squeue's short form
    ("A_STATE_FROM_SLURM_30", "0:0", JobState.UNKNOWN),   # never KeyError
    ("", "", JobState.UNKNOWN),
])
def test_state_table(raw: str, code: str, state: JobState) -> None:
    st = slurm_state(raw, code)
    assert st.state is state
    assert st.native_state == raw.strip()
    if state is not JobState.COMPLETED:
        assert JobStatus(job_id="1", state=state, exit_code=0).shell_exit_code() != 0


def test_every_failure_state_is_final_and_not_ok() -> None:
    for word in ("TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "CANCELLED", "BOOT_FAIL", "DEADLINE"):
        assert SLURM_STATES[word].final and not SLURM_STATES[word].ok


@pytest.mark.parametrize("text,expected", [("3:0", (3, None)), ("0:15", (0, 15)), ("", (None, None)),
                                           ("x:y", (None, None)), ("255:0", (255, None))])
def test_exit_code(text: str, expected: tuple) -> None:
    assert parse_exit_code(text) == expected


@pytest.mark.parametrize("out,job_id", [("123\n", "123"), ("123;ci\n", "123"), (" 7 ", "7")])
def test_parse_submit(out: str, job_id: str) -> None:
    assert parse_submit(out) == job_id


@pytest.mark.parametrize("out", ["", "Submitted batch job 12", "sbatch: error: x"])
def test_parse_submit_quotes_what_it_could_not_read(out: str) -> None:
    with pytest.raises(UnexpectedOutputError) as err:
        parse_submit(out)
    assert "sbatch --parsable" in str(err.value)


def test_parse_sacct() -> None:
    t = parse_sacct(SACCT)
    assert t["4"].state is JobState.COMPLETED and t["4"].name == "it's a $(name) `q` # \\ ü"
    assert t["5"].state is JobState.CANCELED and t["5"].native_state == "CANCELLED by 0"
    assert t["21"].exit_code == 3 and t["21"].state is JobState.FAILED
    assert t["22"].state is JobState.FAILED and t["22"].exit_code == 0
    # 0:125 is Slurm's OOM marker (SIG_OOM 253 & 0x7f), not a signal: a failure with a reason
    assert (t["23"].state, t["23"].signal, t["23"].exit_code) == (JobState.FAILED, None, 0)
    assert "more memory than it was allocated (--mem)" in (t["23"].reason or "")
    assert t["23"].shell_exit_code() == 1
    assert t["30_[2-999%10]"].reason == "JobArrayTaskLimit"
    assert t["31"].name == "we|ird" and t["31"].reason == "Dependency"
    assert all(s.source == "sacct" and s.accounting for s in t.values())


def test_node_fail_and_oom_say_what_happened_unless_slurm_gives_a_reason() -> None:
    """Lines as the testbed's Slurm 22.05 wrote them (issue 12 item 4)."""
    t = parse_sacct("584|NODE_FAIL|0:0|None|c[1-2]|nf\n590|OUT_OF_MEMORY|137:125|None|c1|oom\n")
    assert t["584"].state is JobState.FAILED and t["584"].native_state == "NODE_FAIL"
    assert "a node of the job failed" in (t["584"].reason or "")
    assert (t["590"].exit_code, t["590"].signal, t["590"].shell_exit_code()) == (137, None, 137)
    line = ("JobId=7 JobName=x UserId=root(0) GroupId=root(0) JobState=NODE_FAIL Reason=NodeDown "
            "ExitCode=0:0 Power= ")
    assert parse_scontrol_jobs(line)["7"].reason == "NodeDown"
    assert slurm_state("FAILED", "0:125").signal == 125        # only OUT_OF_MEMORY's is a marker


def test_parse_sacct_rejects_garbage() -> None:
    with pytest.raises(UnexpectedOutputError):
        parse_sacct("sacct: error: something\n")


def test_status_argv_is_one_call_for_many_jobs() -> None:
    argv = status_argv([str(i) for i in range(1000)])
    assert argv[:4] == ["sacct", "--parsable2", "--noheader", "-X"]
    assert argv[-1].count(",") == 999 and argv[-2] == "-j"
    assert argv[argv.index("-o") + 1].endswith("JobName")   # last: may contain '|'


def test_parse_scontrol_jobs() -> None:
    t = parse_scontrol_jobs(SCONTROL)
    assert set(t) == {"15_1", "15_[0,2-3%2]", "12"}
    assert t["15_1"].name == "we|ird UserId=x name" and t["15_1"].state is JobState.COMPLETED
    assert t["15_[0,2-3%2]"].reason == "JobHeldUser" and t["15_[0,2-3%2]"].state is JobState.QUEUED
    assert t["12"].name == 'it\'s a $(name) "q" # \\ ü'
    assert t["12"].state is JobState.FAILED and t["12"].native_state == "TIMEOUT"
    assert not any(s.accounting for s in t.values())
    assert parse_scontrol_jobs("No jobs in the system\n") == {}


def test_config_and_version() -> None:
    assert parse_max_array_size("MailProg = /bin/true\nMaxArraySize            = 10001\n") == 10001
    with pytest.raises(UnexpectedOutputError):
        parse_max_array_size("nothing")
    assert parse_slurm_version("slurm-wlm 22.05.8\n") == (22, 5)
    assert parse_slurm_version("slurm 24.11.5\n") == (24, 11)


@pytest.mark.parametrize("msg,transient", [
    ("sbatch: error: Batch job submission failed: Socket timed out on send/recv operation", True),
    ("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)", True),
    ("sbatch: error: QOSMaxSubmitJobPerUserLimit", True),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination", False),
    ("sbatch: error: invalid partition specified: nope", False),
])
def test_transient_errors(msg: str, transient: bool) -> None:
    assert is_transient(msg) is transient


# ------------------------------------------------------------------ arrays
@pytest.mark.parametrize("n,limit", [(1000, 10001), (1000, 1001), (1000, 1000), (25000, 10001),
                                     (7, 3), (1, 1)])
def test_split_array_costs_ceil_n_over_limit(n: int, limit: int) -> None:
    chunks = split_array(ArraySpec(indices=tuple(range(n))), limit)
    assert len(chunks) == math.ceil(n / limit)
    covered = []
    for c in chunks:
        start, stop = c.positions
        covered.extend(range(start, stop))
        ids = ArraySpec.parse(c.array).indices
        assert max(ids) < limit      # MaxArraySize caps the index
    assert covered == list(range(n))


def test_split_array_keeps_user_indices_when_they_fit() -> None:
    [c] = split_array(ArraySpec(indices=(1, 3, 4, 5, 9), throttle=2), 10)
    assert c.array == "1,3-5,9%2" and c.offset is None


def test_split_array_remaps_large_indices_by_position() -> None:
    # 2 tasks, but index 20000 is beyond the cap: the cost is by count, not by index
    chunks = split_array(ArraySpec(indices=(5, 20000)), 10001)
    assert [c.array for c in chunks] == ["0-1"] and chunks[0].offset == 0
    chunks = split_array(ArraySpec(indices=tuple(range(100, 125)), throttle=4), 10)
    assert [c.array for c in chunks] == ["0-9%4", "0-9%4", "0-4%4"]
    assert [c.offset for c in chunks] == [0, 10, 20]


def test_array_parse() -> None:
    a = ArraySpec.parse("0-4,10-20:5%3")
    assert a.indices == (0, 1, 2, 3, 4, 10, 15, 20) and a.throttle == 3
    with pytest.raises(SpecError):
        ArraySpec.parse("5-1")
    with pytest.raises(SpecError):
        ArraySpec.parse("a-b")


def test_aggregate_array_states() -> None:
    ok = JobStatus(job_id="1_0", state=JobState.COMPLETED, native_state="COMPLETED", exit_code=0)
    bad = JobStatus(job_id="1_1", state=JobState.FAILED, native_state="FAILED", exit_code=2)
    pend = JobStatus(job_id="1_[2-9]", state=JobState.QUEUED, native_state="PENDING")
    assert aggregate("1", [ok, pend]).state is JobState.QUEUED
    agg = aggregate("1", [ok, bad])
    assert agg.state is JobState.FAILED and agg.exit_code == 2 and agg.tasks == 2
    assert aggregate("1", [ok, ok]).state is JobState.COMPLETED
    assert aggregate("1", []).state is JobState.UNKNOWN


def test_dependencies_from_text_mapping_and_jobs() -> None:
    class FakeJob:
        job_ids = ("7", "8")
    deps = parse_dependencies("afterok:1:2,afterany:3")
    assert [(d.kind, d.job_ids) for d in deps] == [("afterok", ("1", "2")), ("afterany", ("3",))]
    deps = parse_dependencies({"afternotok": [FakeJob(), 9]})
    assert deps[0].job_ids == ("7", "8", "9")
    with pytest.raises(SpecError):
        parse_dependencies("after:1")
    with pytest.raises(SpecError):
        parse_dependencies("afterok:1;rm")


# ------------------------------------------------------------------ pyslurm
def test_pyslurm_must_match_major_minor() -> None:
    class Mod:
        __version__ = "22.5.1"
    assert pyslurm_version(Mod) == (22, 5)
    assert compatible((22, 5), (22, 5))[0]
    ok, why = compatible((25, 11), (22, 5))
    assert not ok and "25.11" in why and "22.05" in why


def test_without_pyslurm_the_commands_are_used_with_one_log_line(caplog: pytest.LogCaptureFixture,
                                                                 tmp_path) -> None:
    import sys
    from nsdf_hpc.config import SlurmSettings
    sys.modules.setdefault("pyslurm", None)  # type: ignore[arg-type]  # import fails
    try:
        with caplog.at_level(logging.INFO, logger="nsdf_hpc.schedulers.pyslurm_backend"):
            backend = select_backend(None, SlurmSettings(work_dir=str(tmp_path)))
    finally:
        if sys.modules.get("pyslurm") is None:
            del sys.modules["pyslurm"]
    assert backend.backend == "commands"
    lines = [r for r in caplog.records if r.name.endswith("pyslurm_backend")]
    assert len(lines) == 1 and "using the Slurm commands" in lines[0].getMessage()
