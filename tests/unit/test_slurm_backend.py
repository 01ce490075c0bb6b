"""The Slurm backend on a fake runner and a fake clock: retries, one query per round,
polling backoff, the accounting-disabled path (no Slurm needed)."""
from __future__ import annotations

import os
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import pytest

from nsdf_hpc._exec import CompletedCommand
from nsdf_hpc.errors import SchedulerError, SubmitError
from nsdf_hpc.config import SlurmSettings
from nsdf_hpc.schedulers.backoff import Backoff
from nsdf_hpc.schedulers.commands import ACCOUNTING_DISABLED
from nsdf_hpc.schedulers.job import Job
from nsdf_hpc.schedulers.slurm import Slurm
from nsdf_hpc.schedulers.states import JobState

Answer = Union[CompletedCommand, Callable[[Tuple[str, ...]], CompletedCommand]]


class FakeRunner:
    """Answers by argv[0] from queues (the last answer repeats); records every argv."""

    def __init__(self, answers: Dict[str, List[Answer]]) -> None:
        self.answers = answers
        self.calls: List[Tuple[str, ...]] = []

    def run(self, argv: Sequence[str], **kw: object) -> CompletedCommand:
        argv = tuple(argv)
        self.calls.append(argv)
        queue = self.answers[argv[0]]
        ans = queue.pop(0) if len(queue) > 1 else queue[0]
        return ans(argv) if callable(ans) else ans


def ok(out: str = "", err: str = "", rc: int = 0) -> CompletedCommand:
    return CompletedCommand(("x",), rc, out, err)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, dt: float) -> None:
        self.sleeps.append(dt)
        self.now += dt


def backend(runner: FakeRunner, tmp_path, clock: Optional[FakeClock] = None, **kw: object) -> Slurm:
    clock = clock or FakeClock()
    return Slurm(runner, SlurmSettings(work_dir=str(tmp_path), **kw),  # type: ignore[arg-type]
                 sleep=clock.sleep, clock=clock, rng=random.Random(1))


# ------------------------------------------------------------------ backoff
def test_backoff_grows_to_the_cap_with_jitter_below_it() -> None:
    clock = FakeClock()
    b = Backoff(initial=0.5, factor=1.5, cap=15.0, jitter=0.2, clock=clock, sleep=clock.sleep,
                rng=random.Random(3))
    xs = [b.next_interval() for _ in range(40)]
    assert 0.4 <= xs[0] <= 0.5
    assert all(x <= 15.0 for x in xs)
    assert all(x >= 12.0 for x in xs[15:])          # at the cap: 12..15 s
    assert len(set(round(x, 6) for x in xs[15:])) > 10   # jittered, not in lockstep


def test_backoff_never_sleeps_past_the_deadline() -> None:
    clock = FakeClock()
    b = Backoff(initial=10, cap=10, jitter=0, clock=clock, sleep=clock.sleep)
    assert b.sleep(deadline=3.0) == 3.0 and clock.now == 3.0


# ------------------------------------------------------------------ submit retries
def test_transient_submit_errors_are_retried_with_backoff(tmp_path) -> None:
    err = "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation"
    runner = FakeRunner({"sbatch": [ok(err=err, rc=1), ok(err="QOSMaxSubmitJobPerUserLimit", rc=1),
                                    ok("4242;ci\n")]})
    clock = FakeClock()
    s = backend(runner, tmp_path, clock)
    assert s.sbatch("/x/job.sh") == "4242"
    assert len(runner.calls) == 3 and len(clock.sleeps) == 2
    assert clock.sleeps[1] > clock.sleeps[0] * 1.2      # backing off
    assert all(c[:2] == ("sbatch", "--parsable") for c in runner.calls)
    assert "--wrap" not in " ".join(runner.calls[0])


def test_permanent_submit_error_is_not_retried(tmp_path) -> None:
    runner = FakeRunner({"sbatch": [ok(err="sbatch: error: invalid partition specified: x", rc=1)]})
    with pytest.raises(SubmitError) as e:
        backend(runner, tmp_path).sbatch("/x/job.sh")
    assert not e.value.transient and len(runner.calls) == 1


def test_exhausted_retries_say_transient(tmp_path) -> None:
    runner = FakeRunner({"sbatch": [ok(err="Unable to contact slurm controller", rc=1)]})
    with pytest.raises(SubmitError) as e:
        backend(runner, tmp_path, submit_retries=4).sbatch("/x/job.sh")
    assert e.value.transient and len(runner.calls) == 4


# ------------------------------------------------------------------ one query per round
def _sacct_answer(done_after: int) -> Callable[[Tuple[str, ...]], CompletedCommand]:
    rounds = {"n": 0}

    def answer(argv: Tuple[str, ...]) -> CompletedCommand:
        rounds["n"] += 1
        ids = argv[-1].split(",")
        state = "COMPLETED" if rounds["n"] > done_after else "RUNNING"
        return ok("".join(f"{i}|{state}|0:0|None|c1|n\n" for i in ids))
    return answer


def test_wait_all_costs_one_status_query_per_round(tmp_path) -> None:
    runner = FakeRunner({"sacct": [_sacct_answer(done_after=5)]})
    s = backend(runner, tmp_path)
    jobs = [Job(s, [str(1000 + i)]) for i in range(200)]
    statuses = s.wait_all(jobs)
    assert all(st.state is JobState.COMPLETED for st in statuses)
    assert len(runner.calls) == 6                       # 6 rounds, 200 jobs
    assert all(c[0] == "sacct" and len(c[-1].split(",")) == 200 for c in runner.calls)


def test_polling_at_the_cap_is_at_most_six_calls_per_minute(tmp_path) -> None:
    runner = FakeRunner({"sacct": [_sacct_answer(done_after=10 ** 9)]})
    clock = FakeClock()
    s = backend(runner, tmp_path, clock)
    jobs = [Job(s, [str(i)]) for i in range(1, 1001)]
    s.wait_all(jobs, timeout=1200)
    calls_last_10_min = sum(1 for t in _call_times(clock) if t >= 600)
    assert calls_last_10_min / 10 <= 6
    assert clock.now == pytest.approx(1200, abs=1)


def test_files_there_but_never_final_costs_one_confirmation_then_the_backstop(tmp_path) -> None:
    """Exit-code files written, but Slurm keeps the job RUNNING (requeued, or the accounting
    lags): one confirmation burst, then no more than the watch schedule's backstop."""
    runner = FakeRunner({"sacct": [_sacct_answer(done_after=10 ** 9)]})
    clock = FakeClock()
    s = backend(runner, tmp_path, clock)
    (tmp_path / "j" / "exit").mkdir(parents=True)
    (tmp_path / "j" / "exit" / "7").write_text("0\n")
    s.wait_all([Job(s, ["7"], directory=str(tmp_path / "j"))], timeout=600)
    times = _call_times(clock)[1:]          # the first query is the confirmation's, at 0.1 s
    assert sum(1 for t in times if t < 30) == 8          # 0.1, 0.2, 0.4, ... 12.8 s
    gaps = [b - a for a, b in zip(times[7:-1], times[8:-1])]   # the last one ends at the timeout
    assert min(gaps) >= 15 * 0.8 - 1e-9                  # then only the backstop: every 12-15 s
    assert sum(1 for t in times if t >= 300) / 5 <= 5


def test_exit_files_are_watched_from_submission_before_the_script_makes_their_directory(tmp_path) -> None:
    """Submission makes only the job directory; the script makes exit/ as its first task
    ends. Until then there are no files yet (False: watched), not nothing to watch (None)."""
    s = backend(FakeRunner({}), tmp_path, FakeClock())
    job = Job(s, ["7"], directory=str(tmp_path / "j"))
    assert job.exit_files_done() is None                 # no job directory: nothing to watch
    (tmp_path / "j").mkdir()
    assert job.exit_files_done() is False                # submitted, no task ended yet
    (tmp_path / "j" / "exit").mkdir()
    (tmp_path / "j" / "exit" / "7.tmp").write_text("0\n")
    assert job.exit_files_done() is False
    os.rename(tmp_path / "j" / "exit" / "7.tmp", tmp_path / "j" / "exit" / "7")
    assert job.exit_files_done() is True


def _call_times(clock: FakeClock) -> List[float]:
    t, out = 0.0, [0.0]
    for dt in clock.sleeps:
        t += dt
        out.append(t)
    return out


def test_wait_keeps_polling_through_controller_outages(tmp_path) -> None:
    down = ok(err="sacct: error: Problem talking to the database: Connection refused", rc=1)
    ctld_down = ok(err="slurm_load_jobs error: Unable to contact slurm controller (connect failure)", rc=1)
    runner = FakeRunner({"sacct": [down, down, ok("7|TIMEOUT|0:0|TimeLimit|c1|x\n")],
                         "scontrol": [ctld_down]})
    s = backend(runner, tmp_path)
    st = Job(s, ["7"]).wait()
    assert st.state is JobState.FAILED and st.native_state == "TIMEOUT" and st.exit_code == 0
    assert [c[0] for c in runner.calls] == ["sacct", "scontrol"] * 2 + ["sacct"]


def test_slurmctld_answers_while_slurmdbd_is_down_and_sacct_after(tmp_path) -> None:
    """Issue 12 item 4: slurmdbd stopped during a wait. Each round asks sacct first; while it
    cannot reach the database, slurmctld answers (accounting stays on: never decided "none");
    a job slurmctld does not know either is a transient error, never UNKNOWN."""
    down = ok(err="sacct: error: Problem talking to the database: Connection refused", rc=1)
    line = ("JobId=7 JobName=x UserId=root(0) GroupId=root(0) JobState={} Reason=None "
            "ExitCode={} Power= \n")
    runner = FakeRunner({"sacct": [down, down, down, ok("7|FAILED|5:0|None|c1|x\n")],
                         "scontrol": [ok(line.format("RUNNING", "0:0")),
                                      ok(line.format("FAILED", "5:0")), ok("No jobs in the system\n")]})
    s = backend(runner, tmp_path)
    job = Job(s, ["7"])
    running = job.status()
    assert (running.state, running.source, running.accounting) == (JobState.ACTIVE, "scontrol", True)
    st = job.wait()
    assert (st.state, st.exit_code, st.source) == (JobState.FAILED, 5, "scontrol")
    with pytest.raises(SchedulerError) as err:          # neither knows it: the error, transient
        s.status(["7"])
    assert getattr(err.value, "transient", False) and "Problem talking to the database" in str(err.value)
    again = s.status(["7"])["7"]                        # accounting back: sacct's line
    assert (again.state, again.exit_code, again.source) == (JobState.FAILED, 5, "sacct")
    assert s.accounting == "auto"


def test_wait_timeout_returns_a_non_final_status(tmp_path) -> None:
    runner = FakeRunner({"sacct": [ok("7|PENDING|0:0|Priority|None assigned|x\n")]})
    st = Job(backend(runner, tmp_path), ["7"]).wait(timeout=20)
    assert st.state is JobState.QUEUED and not st.final and st.reason == "Priority"


# ------------------------------------------------------------------ accounting disabled
def test_accounting_disabled_is_detected_and_said(tmp_path) -> None:
    scontrol = ("JobId=8 JobName=x UserId=root(0) GroupId=root(0) JobState=RUNNING Reason=None "
                "ExitCode=0:0\n")
    runner = FakeRunner({"sacct": [ok(err=f"sacct: error: {ACCOUNTING_DISABLED}", rc=1)],
                         "scontrol": [ok(scontrol)]})
    s = backend(runner, tmp_path)
    jobdir = tmp_path / "job"
    (jobdir / "exit").mkdir(parents=True)
    (jobdir / "exit" / "9").write_text("3\n")
    s.dirs["9"] = str(jobdir)
    t = s.status(["8", "9", "10"])
    assert t["8"].state is JobState.ACTIVE and t["8"].source == "scontrol" and not t["8"].accounting
    assert t["9"].state is JobState.FAILED and t["9"].exit_code == 3 and t["9"].source == "exit-code-file"
    assert t["10"].state is JobState.UNKNOWN and "accounting disabled" in (t["10"].reason or "")
    assert s.accounting == "none"
    s.status(["8"])                                   # sacct is not asked again
    assert [c[0] for c in runner.calls] == ["sacct", "scontrol", "scontrol"]


def test_forced_accounting_none_never_calls_sacct(tmp_path) -> None:
    runner = FakeRunner({"scontrol": [ok("No jobs in the system\n")]})
    s = backend(runner, tmp_path, accounting="none")
    assert s.status(["5"])["5"].state is JobState.UNKNOWN
    assert [c[0] for c in runner.calls] == ["scontrol"]


def test_forced_sacct_reports_disabled_accounting(tmp_path) -> None:
    runner = FakeRunner({"sacct": [ok(err=f"sacct: error: {ACCOUNTING_DISABLED}", rc=1)]})
    with pytest.raises(SchedulerError):
        backend(runner, tmp_path, accounting="sacct").status(["5"])


def test_jobs_not_yet_in_the_database_come_from_scontrol(tmp_path) -> None:
    scontrol = ("JobId=12 JobName=x UserId=root(0) GroupId=root(0) JobState=PENDING "
                "Reason=Priority ExitCode=0:0\n")
    runner = FakeRunner({"sacct": [ok("11|COMPLETED|0:0|None|c1|x\n")], "scontrol": [ok(scontrol)]})
    t = backend(runner, tmp_path).status(["11", "12"])
    assert t["11"].source == "sacct" and t["12"].state is JobState.QUEUED and t["12"].accounting


def test_cancel_is_one_call(tmp_path) -> None:
    runner = FakeRunner({"scancel": [ok()]})
    backend(runner, tmp_path).cancel(["1", "2", "3", "2"])
    assert runner.calls == [("scancel", "1", "2", "3")]


def test_settings_from_config_and_env(tmp_path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[slurm]\nwork_dir = "/scratch/j"\npoll_cap = 30.0\naccounting = "none"\n')
    s = SlurmSettings.load({"HOME": "/h"}, files=[str(conf)])
    assert s.work_dir == "/scratch/j" and s.poll_cap == 30.0 and s.accounting == "none"
    s = SlurmSettings.load({"HOME": "/h", "NSDF_HPC_SLURM_DIR": "/x"}, files=[])
    assert s.work_dir == "/x"
    assert SlurmSettings.load({"HOME": "/h"}, files=[]).work_dir == os.path.join("/h", ".nsdf-hpc", "jobs")


# ------------------------------------------------------------------ issue 14: bad work dir
@pytest.mark.parametrize("kind", ["file", "readonly"])
def test_a_bad_slurm_dir_is_one_config_error_naming_the_variable(tmp_path, kind: str) -> None:
    from nsdf_hpc.config import load_slurm_settings
    from nsdf_hpc.errors import ConfigError
    from nsdf_hpc.schedulers.submit import check_work_dir
    if kind == "file":
        target = tmp_path / "afile"
        target.write_text("x")
        path = str(target / "jobs")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes everywhere")
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
        path = str(target)
    settings = load_slurm_settings({"HOME": str(tmp_path), "NSDF_HPC_SLURM_DIR": path}, files=[])
    with pytest.raises(ConfigError) as e:
        check_work_dir(settings)
    msg = str(e.value)
    assert "NSDF_HPC_SLURM_DIR=" in msg and path in msg and "\n" not in msg
    assert ("not a directory" if kind == "file" else "not writable") in msg


def test_slurm_dir_at_etc_passwd_is_not_a_directory(tmp_path) -> None:
    from nsdf_hpc.config import load_slurm_settings
    from nsdf_hpc.errors import ConfigError
    from nsdf_hpc.schedulers.submit import check_work_dir
    s = load_slurm_settings({"HOME": str(tmp_path), "NSDF_HPC_SLURM_DIR": "/etc/passwd"}, files=[])
    with pytest.raises(ConfigError, match=r"NSDF_HPC_SLURM_DIR=/etc/passwd: /etc/passwd is not a directory"):
        check_work_dir(s)


def test_bad_slurm_settings_are_one_line_config_errors(tmp_path) -> None:
    from nsdf_hpc.config import load_slurm_settings
    from nsdf_hpc.errors import ConfigError
    conf = tmp_path / "c.toml"
    conf.write_text('[slurm]\npoll_cap = "soon"\n')
    with pytest.raises(ConfigError) as e:
        load_slurm_settings({"HOME": "/h"}, files=[str(conf)])
    assert "poll_cap" in str(e.value) and str(conf) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="NSDF_HPC_SLURM_ACCOUNTING"):
        load_slurm_settings({"HOME": "/h", "NSDF_HPC_SLURM_ACCOUNTING": "maybe"}, files=[])
    with pytest.raises(ConfigError, match="unknown"):
        load_slurm_settings({"HOME": "/h"}, files=[], poll_kap=3)
    # precedence: defaults < files < env < arguments
    conf.write_text('[slurm]\nwork_dir = "/f"\naccounting = "none"\n')
    env = {"HOME": "/h", "NSDF_HPC_SLURM_DIR": "/e"}
    s = load_slurm_settings(env, files=[str(conf)])
    assert (s.work_dir, s.accounting, s.source("work_dir")) == ("/e", "none", "NSDF_HPC_SLURM_DIR")
    assert load_slurm_settings(env, files=[str(conf)], work_dir="/a").work_dir == "/a"


# ------------------------------------------------------------------ issue 16: one array task
SACCT_TASKS = ("1349_0|COMPLETED|0:0|JobArrayTaskLimit|c1|arr\n"
               "1349_10|RUNNING|0:0|None|c2|arr\n"
               "1349_[11-20%2]|PENDING|0:0|JobArrayTaskLimit|None assigned|arr\n")


def test_attach_status_and_cancel_one_array_task(tmp_path) -> None:
    runner = FakeRunner({"sacct": [ok(SACCT_TASKS)], "scancel": [ok()], "scontrol": [ok("")]})
    s = backend(runner, tmp_path)
    task = s.attach("1349_10")
    assert task.job_ids == ("1349_10",) and task.is_task and not task.is_array
    st = task.status()
    assert (st.job_id, st.state) == ("1349_10", JobState.ACTIVE)
    assert s.attach("1349_12").status().state is JobState.QUEUED   # inside the pending range
    task.cancel()
    assert runner.calls[-1] == ("scancel", "1349_10")


def test_a_foreign_job_costs_one_query_for_status_and_asks_its_log_paths_only_for_logs(tmp_path) -> None:
    """A job nsdf-hpc did not submit: `status` and `cancel` are one scheduler call each (the
    log paths come from scontrol when a log is read), and an array is still told by its tasks."""
    ctl = (f"JobId=90 ArrayJobId=90 ArrayTaskId=0 JobName=x StdErr={tmp_path}/e-90.err StdIn=/dev/null "
           f"StdOut={tmp_path}/o-90.out Power=\n")
    runner = FakeRunner({"sacct": [ok("90_0|COMPLETED|0:0|None|c1|x\n"), ok("91|COMPLETED|0:0|None|c1|x\n")],
                         "scontrol": [ok(ctl)], "scancel": [ok()]})
    s = backend(runner, tmp_path)
    arr = s.attach("90")
    st = arr.status()
    assert [c[0] for c in runner.calls] == ["sacct"]
    assert (st.job_id, st.state, st.native_state, st.tasks) == ("90", JobState.COMPLETED, "COMPLETED:1", 1)
    plain = s.attach("91")
    assert plain.status().native_state == "COMPLETED" and [c[0] for c in runner.calls] == ["sacct"] * 2
    plain.cancel()
    assert [c[0] for c in runner.calls] == ["sacct", "sacct", "scancel"]
    (tmp_path / "o-90.out").write_text("out\n")
    assert arr.logs() == "out\n" and arr.is_array
    assert arr.logs() == "out\n" and [c[0] for c in runner.calls].count("scontrol") == 1   # asked once
    task = s.attach("90_0")
    assert task.log_path() == f"{tmp_path}/o-90.out" and not task.is_array   # attach's choice stays


def test_a_pending_reason_never_shows_on_a_final_task(tmp_path) -> None:
    from nsdf_hpc.schedulers.commands import parse_sacct
    t = parse_sacct(SACCT_TASKS)
    assert t["1349_0"].reason is None                       # COMPLETED: JobArrayTaskLimit dropped
    assert t["1349_[11-20%2]"].reason == "JobArrayTaskLimit"  # still pending: kept


def test_invalid_job_ids_are_refused(tmp_path) -> None:
    from nsdf_hpc.errors import SpecError
    s = backend(FakeRunner({}), tmp_path)
    for bad in ("12;rm", "12_", "_3", "12_3_4", "abc"):
        with pytest.raises(SpecError):
            s.attach(bad)


def test_logs_of_an_array_show_every_task_headed_by_its_id(tmp_path) -> None:
    s = backend(FakeRunner({}), tmp_path)
    for t in (0, 1):
        (tmp_path / f"77_{t}.out").write_text(f"task {t}\n")
    prov = {"array": True, "indices": [0, 1], "output": str(tmp_path / "%A_%a.out"),
            "chunks": [{"job_id": "77", "array": "0-1", "offset": None, "positions": [0, 2]}]}
    job = Job(s, ["77"], provenance=prov)
    assert job.logs() == "==> 77_0 <==\ntask 0\n\n==> 77_1 <==\ntask 1\n"
    assert job.logs(task=1) == "task 1\n" and job.logs(task="77_0") == "task 0\n"


def test_follow_yields_output_as_written_until_final(tmp_path) -> None:
    log = tmp_path / "5.out"
    states = iter(["RUNNING", "RUNNING", "COMPLETED"])

    def sacct(argv: Tuple[str, ...]) -> CompletedCommand:
        state = next(states, "COMPLETED")
        with open(log, "a") as fh:         # the job writes one line per poll
            fh.write(f"{state}\n")
        return ok(f"5|{state}|0:0|None|c1|x\n")
    clock = FakeClock()
    s = backend(FakeRunner({"sacct": [sacct]}), tmp_path, clock)
    job = Job(s, ["5"], provenance={"output": str(log)})
    log.write_text("first\n")
    lines = list(job.follow_lines(backoff=Backoff(initial=1, cap=1, jitter=0, clock=clock,
                                                  sleep=clock.sleep)))
    assert lines == ["first\n", "RUNNING\n", "RUNNING\n", "COMPLETED\n"]


def test_log_patterns_use_the_given_user_not_os_environ(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("USER", "from-os-environ")
    s = Slurm(FakeRunner({}), SlurmSettings(work_dir=str(tmp_path)), env={"USER": "alice"})
    job = Job(s, ["9"], provenance={"output": "/x/%u-%j.out"}, user=s.user)
    assert job.log_path() == "/x/alice-9.out"


# ------------------------------------------------------------------ exit-code files (issue 11 goal 5)
def _watched_job(s: Slurm, tmp_path, job_id: str, end_at: float, clock: FakeClock, **prov: object) -> Job:
    """A job with its nsdf-hpc directory whose exit-code file appears at ``end_at`` (fake time),
    and an sacct that says COMPLETED from then on."""
    d = tmp_path / f"job-{job_id}"
    (d / "exit").mkdir(parents=True)
    job = Job(s, [job_id], directory=str(d), provenance=prov)
    real = clock.sleep

    def sleep(dt: float) -> None:
        real(dt)
        if clock.now >= end_at:
            names = [job_id] if not prov.get("indices") else [f"{job_id}_{i}" for i in prov["indices"]]  # type: ignore[union-attr]
            for n in names:
                (d / "exit" / n).write_text("0\n")
    s._sleep = sleep
    return job


def _sacct_by_clock(clock: FakeClock, job_id: str, end_at: float, tasks: int = 0):
    def answer(argv: Tuple[str, ...]) -> CompletedCommand:
        state = "COMPLETED" if clock.now >= end_at + 0.05 else "RUNNING"
        if not tasks:
            return ok(f"{job_id}|{state}|0:0|None|c1|x\n")
        return ok("".join(f"{job_id}_{i}|{state}|0:0|None|c1|x\n" for i in range(tasks)))
    return answer


@pytest.mark.parametrize("end_at", [2.0, 60.0, 3600.0])
def test_the_end_is_noticed_from_the_exit_file_within_a_second_with_few_queries(tmp_path, end_at: float) -> None:
    clock = FakeClock()
    runner = FakeRunner({"sacct": [_sacct_by_clock(clock, "41", end_at)]})
    s = backend(runner, tmp_path, clock)
    job = _watched_job(s, tmp_path, "41", end_at, clock)
    st = job.wait()
    assert st.state is JobState.COMPLETED
    assert clock.now - end_at <= 1.0                    # noticed within a second
    minutes = max(1.0, clock.now / 60)
    assert len(runner.calls) / minutes <= 6 + 1 / minutes   # the backstop, plus one confirmation


def test_an_array_is_done_when_every_task_left_its_file(tmp_path) -> None:
    clock = FakeClock()
    runner = FakeRunner({"sacct": [_sacct_by_clock(clock, "42", 30.0, tasks=200)]})
    s = backend(runner, tmp_path, clock)
    job = _watched_job(s, tmp_path, "42", 30.0, clock, array=True, indices=list(range(200)))
    st = job.wait()
    assert st.state is JobState.COMPLETED and clock.now - 30.0 <= 1.0
    assert len(runner.calls) <= 6


def test_a_job_that_leaves_no_exit_file_is_still_noticed_by_the_queries(tmp_path) -> None:
    # cancelled or timed out: no exit-code file; the backstop queries find the end
    clock = FakeClock()
    runner = FakeRunner({"sacct": [lambda argv: ok("43|CANCELLED by 0|0:15|None|c1|x\n" if clock.now >= 40
                                                   else "43|RUNNING|0:0|None|c1|x\n")]})
    s = backend(runner, tmp_path, clock)
    d = tmp_path / "job-43"
    (d / "exit").mkdir(parents=True)
    st = Job(s, ["43"], directory=str(d)).wait()
    assert st.state is JobState.CANCELED and 40 <= clock.now <= 40 + 15


def test_an_oom_killed_job_reports_its_commands_exit_code_not_slurms_marker(tmp_path) -> None:
    """Slurm 22.05 records an OOM-killed job as OUT_OF_MEMORY 0:125 whatever the script
    returned (issue 12 item 4, seen on the testbed); the exit-code file has the command's 137."""
    runner = FakeRunner({"sacct": [ok("9|OUT_OF_MEMORY|0:125|None|c1|x\n10|OUT_OF_MEMORY|0:125|None|c1|y\n")]})
    s = backend(runner, tmp_path)
    jobdir = tmp_path / "job"
    (jobdir / "exit").mkdir(parents=True)
    (jobdir / "exit" / "9").write_text("137\n")
    s.dirs["9"] = str(jobdir)
    t = s.status(["9", "10"])
    assert (t["9"].state, t["9"].exit_code, t["9"].signal, t["9"].shell_exit_code()) == (JobState.FAILED, 137, None, 137)
    assert "more memory than it was allocated" in (t["9"].reason or "")
    assert (t["10"].exit_code, t["10"].shell_exit_code()) == (0, 1)     # no file: still a failure


def test_a_failed_line_without_exit_code_is_slurmdbd_catching_up_and_slurmctld_answers(tmp_path) -> None:
    """Seen after slurmdbd came back (issue 12 item 4): sacct said FAILED 0:0 (End Unknown)
    for a job that exited 5, and FAILED 5:0 some seconds later. slurmctld, while it still
    knows the job, answers instead; a job it has forgotten keeps sacct's line."""
    line = ("JobId=7 JobName=x UserId=root(0) GroupId=root(0) JobState=FAILED Reason=NonZeroExitCode "
            "ExitCode=5:0 Power= \n")
    runner = FakeRunner({"sacct": [ok("7|FAILED|0:0|None|c1|x\n8|FAILED|0:0|None|c1|y\n"),
                                   ok("7|FAILED|5:0|None|c1|x\n")],
                         "scontrol": [ok(line)]})
    s = backend(runner, tmp_path)
    t = s.status(["7", "8"])
    assert (t["7"].state, t["7"].exit_code, t["7"].source, t["7"].accounting) == (JobState.FAILED, 5, "scontrol", True)
    assert (t["8"].state, t["8"].exit_code, t["8"].source) == (JobState.FAILED, 0, "sacct")
    assert s.status(["7"])["7"].source == "sacct"
    assert [c[0] for c in runner.calls] == ["sacct", "scontrol", "sacct"]
