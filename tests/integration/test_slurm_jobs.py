"""The Slurm layer against the testbed's real cluster (2 nodes, slurmdbd, Slurm 22.05).

The slow case (a job hitting its time limit: slurmctld checks limits about once a minute) is
submitted by the first test and checked by the last, so the suite stays near 2 minutes.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from nsdf_hpc._exec import CompletedCommand, SubprocessRunner
from nsdf_hpc.client import Client
from nsdf_hpc.schedulers import Job, JobState, Slurm, SlurmSettings

from .helpers import root_cache

pytestmark = [pytest.mark.integration, pytest.mark.slurm]

ROOT = Path(__file__).resolve().parents[2]
SCRATCH = Path("/var/tmp/nsdf-scratch")
FAST = "udocker"          # starts fastest
IMAGE = "busybox"         # docker.io/library/busybox, mirrored to the testbed registry
TESTBED_SLURM_ENV = {"SLURM_CI_ROOT": "/var/tmp/slurm-ci", "SLURM_CI_NODES": "2",
                     "SLURM_CI_ACCOUNTING": "slurmdbd", "SLURM_CI_CPUS": "16",
                     "SLURM_CI_MIN_JOB_AGE": "600", "SLURM_CI_SLURMD_TIMEOUT": "20",
                     "SLURM_CI_CGROUP": "auto",
                     # testbed.sh runs slurmrestd too: without it the restart below would
                     # reconfigure the cluster without JWT and leave slurmrestd stopped
                     "SLURM_CI_RESTD": "1"}


@pytest.fixture(scope="module")
def work_dir() -> Iterator[Path]:
    d = SCRATCH / f"pytest-slurm-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    yield d
    if os.environ.get("NSDF_KEEP_JOBS") != "1":   # keep scripts and logs for debugging
        import shutil
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cache() -> Path:
    return root_cache()


@pytest.fixture(scope="module")
def client(cache: Path) -> Client:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env["NSDF_HPC_CACHE"] = str(cache)
    return Client(env=env)


@pytest.fixture(scope="module")
def slurm(work_dir: Path) -> Slurm:
    return Slurm(settings=SlurmSettings(work_dir=str(work_dir), poll_initial=0.25, poll_cap=2.0))


@pytest.fixture(scope="module")
def timeout_job(client: Client, slurm: Slurm) -> Job:
    return client.submit(IMAGE, ["sleep", "300"], runtime=FAST, scheduler=slurm, time="0:03",
                         job_name="nsdf-timeout")


def sacct_row(job_id: str, fields: str = "State,ExitCode") -> str:
    return subprocess.run(["sacct", "-X", "-n", "-P", "-o", fields, "-j", job_id],
                          capture_output=True, text=True).stdout.strip()


def test_00_submit_the_time_limit_job_early(timeout_job: Job) -> None:
    assert timeout_job.job_id.isdigit()


def test_single_node_job(client: Client, slurm: Slurm) -> None:
    job = client.submit(IMAGE, ["sh", "-c", "echo out; echo err >&2; echo $SLURM_JOB_ID"],
                        runtime=FAST, scheduler=slurm, job_name="single")
    st = job.wait(timeout=60)
    assert st.state is JobState.COMPLETED and st.exit_code == 0 and st.source == "sacct"
    assert job.logs().splitlines() == ["out", job.job_id]
    assert job.logs("stderr").strip() == "err" and job.logs(tail=1) == f"{job.job_id}\n"
    prov = json.loads((Path(job.directory) / "provenance.json").read_text())
    script = (Path(job.directory) / "job.sh").read_bytes()
    assert prov["script_sha256"] == hashlib.sha256(script).hexdigest()
    assert prov["job_ids"] == [job.job_id] and prov["runtime"] == FAST and prov["runtime_version"]
    # udocker runs behind nsdf_hpc's signal relay (python -I -S _udocker_relay.py ... udocker ...)
    assert prov["digest"].startswith("sha256:") and any(a.endswith("/udocker") for a in prov["argv"][:8])
    assert (Path(job.directory) / "exit" / job.job_id).read_text().strip() == "0"
    assert b"--wrap" not in script
    again = slurm.attach(job.job_id)          # attach by id: same answers
    assert again.status().state is JobState.COMPLETED and again.logs() == job.logs()


@pytest.mark.parametrize("runtime", ["apptainer", "charliecloud", "podman", "udocker",
                                     pytest.param("podman-hpc", marks=pytest.mark.podman_hpc)])
def test_two_node_job_runs_one_container_per_rank_on_both_nodes(client: Client, slurm: Slurm,
                                                                runtime: str) -> None:
    cmd = ["sh", "-c", 'echo "rank=$SLURM_PROCID node=$SLURMD_NODENAME pmi=${PMI_RANK-none}"']
    job = client.submit(IMAGE, cmd, runtime=runtime, scheduler=slurm, nodes=2,
                        ntasks_per_node=1, mpi="pmi2", job_name=f"two-nodes-{runtime}")
    st = job.wait(timeout=60)
    assert st.state is JobState.COMPLETED, (st, job.logs("stderr"))
    lines = sorted(job.logs().splitlines())
    assert lines == ["rank=0 node=c1 pmi=0", "rank=1 node=c2 pmi=1"], job.logs("stderr")
    show = subprocess.run(["scontrol", "show", "job", "-o", job.job_id], capture_output=True, text=True)
    assert " NodeList=c[1-2] " in show.stdout
    assert "srun --export=ALL --kill-on-bad-exit=1 --mpi=pmi2" in Path(job.script).read_text()


def test_array_template_and_split_by_max_array_size(client: Client, slurm: Slurm, work_dir: Path) -> None:
    arr = client.submit_array(IMAGE, template=["sh", "-c", "echo task {index}"], indices="0-3",
                              runtime=FAST, scheduler=slurm, job_name="array")
    # a cluster whose MaxArraySize is 3: indices 10..14 are beyond it; 5 tasks, ceil(5/3) calls
    small = Slurm(settings=SlurmSettings(work_dir=str(work_dir), poll_initial=0.25, poll_cap=2.0))
    small._max_array = 3
    calls: List[List[str]] = []
    real = small.runner.run

    def counting(argv, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(argv))
        return real(argv, **kw)
    small.runner.run = counting  # type: ignore[assignment]
    split = client.submit_array(IMAGE, commands=[["echo", f"cmd {i}"] for i in range(5)],
                                indices=list(range(10, 15)), runtime=FAST, scheduler=small)
    assert len([c for c in calls if c[0] == "sbatch"]) == 2 and len(split.job_ids) == 2
    statuses = slurm.wait_all([arr, split], timeout=90)
    assert [s.state for s in statuses] == [JobState.COMPLETED, JobState.COMPLETED], statuses
    assert statuses[0].tasks == 4
    assert [arr.logs(task=i).strip() for i in range(4)] == [f"task {i}" for i in range(4)]
    assert [split.logs(task=i).strip() for i in range(10, 15)] == [f"cmd {i}" for i in range(5)]


def test_array_task_ids_attach_status_logs_and_cancel_one_task(
        client: Client, slurm: Slurm, work_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nsdf_hpc
    arr = client.submit_array(IMAGE, template=["sh", "-c", "echo task {index}"], indices="0-2",
                              runtime=FAST, scheduler=slurm, job_name="array-tasks")
    st = arr.wait(timeout=90)
    assert st.state is JobState.COMPLETED and st.tasks == 3, st
    # one task by Slurm's own id, through the backend and through nsdf_hpc.attach
    one = slurm.attach(f"{arr.job_id}_1")
    assert one.job_ids == (f"{arr.job_id}_1",)
    ts = one.status()
    assert (ts.job_id, ts.state, ts.exit_code) == (f"{arr.job_id}_1", JobState.COMPLETED, 0)
    assert one.logs() == "task 1\n"
    monkeypatch.setenv("NSDF_HPC_SLURM_DIR", str(work_dir))
    assert nsdf_hpc.attach(f"{arr.job_id}_2").logs() == "task 2\n"
    # the whole array: every task's log, each headed by its id
    assert slurm.attach(arr.job_id).logs() == "".join(
        f"{'' if i == 0 else chr(10)}==> {arr.job_id}_{i} <==\ntask {i}\n" for i in range(3))
    # no pending reason (JobArrayTaskLimit, ...) on a finished task
    whole = slurm.attach(arr.job_id)
    whole.status()
    assert len(whole.tasks) == 3 and all(t.reason is None for t in whole.tasks.values()), whole.tasks
    # cancel exactly one running task: scancel JOBID_TASK
    sleepy = client.submit_array(IMAGE, template=["sleep", "60"], indices="0-1", runtime=FAST,
                                 scheduler=slurm, job_name="array-cancel-one")
    deadline = time.time() + 40
    while sleepy.status().state is not JobState.ACTIVE and time.time() < deadline:
        time.sleep(0.3)
    victim = slurm.attach(f"{sleepy.job_id}_1")
    victim.cancel()
    vs = victim.wait(timeout=30)
    assert vs.state is JobState.CANCELED, vs
    other = slurm.attach(f"{sleepy.job_id}_0").status()
    assert other.state in (JobState.QUEUED, JobState.ACTIVE), other   # untouched
    sleepy.cancel()
    assert sleepy.wait(timeout=30).state is JobState.CANCELED


def test_dependency_chain(client: Client, slurm: Slurm, work_dir: Path) -> None:
    shared = work_dir / "dependency-data"
    shared.mkdir()
    a = client.submit(IMAGE, ["sh", "-c", f"sleep 1; echo A > {shared}/a"], runtime=FAST,
                      scheduler=slurm, job_name="dep-a", binds=[str(shared)])
    b = client.submit(IMAGE, ["sh", "-c", f"cat {shared}/a; echo B"], runtime=FAST, scheduler=slurm,
                      job_name="dep-b", binds=[str(shared)], dependencies={"afterok": [a]})
    c = client.submit(IMAGE, ["echo", "never"], runtime=FAST, scheduler=slurm, job_name="dep-c",
                      dependencies=f"afternotok:{a.job_id}")
    d = client.submit(IMAGE, ["echo", "always"], runtime=FAST, scheduler=slurm, job_name="dep-d",
                      dependencies={"afterany": [b.job_id, c]})
    sa, sb, sc, sd = slurm.wait_all([a, b, c, d], timeout=90)
    assert (sa.state, sb.state, sd.state) == (JobState.COMPLETED,) * 3
    assert b.logs().splitlines() == ["A", "B"]
    assert sc.state is JobState.CANCELED      # afternotok of a success: never runs
    assert d.logs() == "always\n"


# podman is not here: its store is shared between caches, so a prune in one cache leaves the
# image (pinned by digest) in the store, and the job rightly runs it
@pytest.mark.parametrize("runtime", ["apptainer", "charliecloud", "udocker"])
def test_a_queued_job_keeps_its_image_and_one_removed_anyway_exits_125_with_a_message(
        client: Client, slurm: Slurm, runtime: str, tmp_path: Path) -> None:
    """Issue 12 item 5: prune keeps the image of a queued job (its pin). Issue 14 item 8: an
    image removed anyway (by hand, here ``Client.remove``) means nothing ran: 125 and a
    message, not the runtime's raw error."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env["NSDF_HPC_CACHE"] = str(tmp_path / "cache")
    private = Client(env=env)
    first = client.submit(IMAGE, ["sleep", "4"], runtime=FAST, scheduler=slurm, job_name="pruned-a")
    job = private.submit(IMAGE, ["echo", "must not run"], runtime=runtime, scheduler=slurm,
                         job_name="pruned-b", dependencies={"afterany": [first]})
    kept: List[str] = []
    assert private.prune(max_size=0, on_kept=lambda e, why: kept.append(why)) == []
    assert kept == [f"Slurm job {job.job_id} (queued or running) needs it"], kept
    entries = private.cache.entries()
    assert entries and all(private.remove(e) for e in entries)
    st = job.wait(timeout=120)
    assert (st.state, st.exit_code) == (JobState.FAILED, 125), (st, job.logs("stderr"))
    assert "no longer in the cache" in job.logs("stderr") and job.logs() == ""


def test_cancel(client: Client, slurm: Slurm) -> None:
    job = client.submit(IMAGE, ["sleep", "120"], runtime=FAST, scheduler=slurm, job_name="cancel-me")
    deadline = time.time() + 30
    while job.status().state is not JobState.ACTIVE and time.time() < deadline:
        time.sleep(0.3)
    job.cancel()
    st = job.wait(timeout=30)
    assert st.state is JobState.CANCELED and st.native_state.startswith("CANCELLED")


RANK_RACES = {
    # every rank exits 3: the first to end makes srun kill the other (SIGTERM, 143); srun then
    # exited 15 (4 of 6 jobs) or the job got 3, by timing (issue 12 item 8)
    "every-rank-exits-3": ('exit 3', 3),
    # rank 1 is still running when rank 0 fails: it is always the one killed
    "rank-1-slower": ('if [ "$SLURM_PROCID" = 1 ]; then sleep 4; fi; exit 3', 3),
    # only rank 0 fails by itself; rank 1 (killed, 143) would have exited 0
    "only-rank-0-fails": ('if [ "$SLURM_PROCID" = 0 ]; then exit 3; fi; sleep 4', 3),
    # rank 1 fails first with 5, rank 0 later with 3 (killed before): the first failure wins
    "first-failure-wins": ('if [ "$SLURM_PROCID" = 1 ]; then exit 5; fi; sleep 4; exit 3', 5),
}


@pytest.mark.parametrize("case", list(RANK_RACES))
def test_a_multi_rank_job_reports_the_exit_code_of_the_rank_that_failed_by_itself(
        client: Client, slurm: Slurm, case: str) -> None:
    """Issue 12 item 8: srun --kill-on-bad-exit kills the other ranks when one fails; the
    job must report the command's own exit code, not srun's 15 or a killed rank's 143. The
    racy case runs 6 times (it failed 4 of 6 before the fix), the others twice."""
    cmd, want = RANK_RACES[case]
    runs = 6 if case == "every-rank-exits-3" else 2
    jobs = [client.submit(IMAGE, ["sh", "-c", cmd], runtime="apptainer", scheduler=slurm, nodes=2,
                          ntasks_per_node=1, job_name=f"rank-race-{i}") for i in range(runs)]
    got = []
    for job in jobs:
        st = job.wait(timeout=120)
        got.append((st.native_state, st.exit_code, sacct_row(job.job_id)))
    assert got == [("FAILED", want, f"FAILED|{want}:0")] * runs, got


def test_failing_job(client: Client, slurm: Slurm) -> None:
    job = client.submit(IMAGE, ["sh", "-c", "echo bad >&2; exit 3"], runtime="apptainer",
                        scheduler=slurm, job_name="fails")
    st = job.wait(timeout=60)
    assert (st.state, st.native_state, st.exit_code) == (JobState.FAILED, "FAILED", 3)
    assert st.shell_exit_code() == 3 and job.logs("stderr").strip() == "bad"


def test_accounting_disabled_path(client: Client, work_dir: Path) -> None:
    # the real cluster keeps slurmdbd: the disabled path is forced, and detected from a sacct
    # answering as it does without accounting storage
    forced = Slurm(settings=SlurmSettings(work_dir=str(work_dir), accounting="none",
                                          poll_initial=0.25, poll_cap=2.0))
    ok = client.submit(IMAGE, ["true"], runtime=FAST, scheduler=forced, job_name="noacct-ok")
    bad = client.submit(IMAGE, ["sh", "-c", "exit 4"], runtime=FAST, scheduler=forced,
                        job_name="noacct-bad")
    s_ok, s_bad = forced.wait_all([ok, bad], timeout=60)
    assert s_ok.state is JobState.COMPLETED and not s_ok.accounting and s_ok.source == "scontrol"
    assert s_bad.state is JobState.FAILED and s_bad.exit_code == 4 and not s_bad.accounting

    class NoAccounting(SubprocessRunner):
        """sacct as on a cluster without slurmdbd; scontrol forgets the jobs (MinJobAge passed)."""
        def run(self, argv, **kw):  # type: ignore[no-untyped-def,override]
            if argv[0] == "sacct":
                return CompletedCommand(tuple(argv), 1, "",
                                        "sacct: error: Slurm accounting storage is disabled\n")
            if argv[0] == "scontrol" and argv[1:3] == ["show", "job"]:
                return CompletedCommand(tuple(argv), 0, "No jobs in the system\n", "")
            return super().run(argv, **kw)
    auto = Slurm(NoAccounting(), SlurmSettings(work_dir=str(work_dir), accounting="auto"))
    table = auto.status([ok.job_id, bad.job_id])
    assert auto.accounting == "none"
    assert table[ok.job_id].state is JobState.COMPLETED and table[ok.job_id].source == "exit-code-file"
    assert table[bad.job_id].exit_code == 4 and not table[bad.job_id].accounting


def test_hostile_values_round_trip_and_nothing_runs_on_the_submit_host(
        client: Client, slurm: Slurm, tmp_path: Path) -> None:
    marker = Path("/tmp") / f"nsdf-marker-{uuid.uuid4().hex[:8]}"
    evil = f"it's \"q\" $(touch {marker}) `touch {marker}` ${{HOME}} \\ # ü ✓ ;|&"
    value = evil + "\nsecond line\ttab"
    job = client.submit(IMAGE, ["sh", "-c", 'printf "%s\\0" "$1" "$V" "$SLURM_JOB_NAME"', "sh", value],
                        env={"V": value}, runtime="apptainer", scheduler=slurm, job_name=evil)
    st = job.wait(timeout=60)
    assert st.state is JobState.COMPLETED, job.logs("stderr")
    out = Path(job.log_path()).read_bytes().decode().split("\0")
    assert out[:3] == [value, value, evil]
    show = subprocess.run(["scontrol", "show", "job", "-o", job.job_id], capture_output=True, text=True).stdout
    assert f"JobName={evil} UserId=" in show
    assert not marker.exists()
    # sacct is not compared: slurmdbd stores '"' as '`' and shows "allocation" for a while


def test_slurmctld_restarted_while_wait_runs(client: Client, work_dir: Path) -> None:
    pidfile = Path("/var/tmp/slurm-ci/run/slurmctld.pid")
    both = [Slurm(settings=SlurmSettings(work_dir=str(work_dir), accounting=a, poll_initial=0.25,
                                         poll_cap=2.0)) for a in ("auto", "none")]
    job = client.submit(IMAGE, ["sh", "-c", "sleep 6; exit 5"], runtime=FAST, scheduler=both[0],
                        job_name="restart")
    deadline = time.time() + 30
    while job.status().state is not JobState.ACTIVE and time.time() < deadline:
        time.sleep(0.3)
    results: Dict[str, object] = {}

    def waiter(s: Slurm) -> None:
        results[s.accounting] = s.attach(job.job_id).wait(timeout=120)
    threads = [threading.Thread(target=waiter, args=(s,)) for s in both]
    for t in threads:
        t.start()
    os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    time.sleep(3)
    down = subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout
    r = subprocess.run(["bash", str(ROOT / "tests/testbed/slurm-start.sh")], capture_output=True,
                       text=True, env={**os.environ, **TESTBED_SLURM_ENV}, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for t in threads:
        t.join(timeout=150)
    assert "DOWN" in down
    for mode in ("auto", "none"):
        st = results[mode]
        assert st.state is JobState.FAILED and st.exit_code == 5, (mode, st)  # type: ignore[attr-defined]


def test_a_requeued_job_is_followed_to_its_final_state(client: Client, slurm: Slurm) -> None:
    """Issue 12 item 4: `scontrol requeue` while the job runs. Slurm kills the first run and
    holds the job back (BeginTime about 2 minutes on, Slurm 22.05); `wait()` must not take the
    killed run's end for the job's, and reports the second run's exit code."""
    job = client.submit(IMAGE, ["sh", "-c", "echo run; sleep 4; exit 3"], runtime=FAST,
                        scheduler=slurm, job_name="requeue")
    try:
        # the job's own output says it runs: right after the restart test, sacct (catching
        # up) said PENDING again after slurmctld had said RUNNING (job 709, one run)
        deadline = time.time() + 60
        while "run" not in job.logs() and time.time() < deadline:
            time.sleep(0.3)
        assert job.logs() == "run\n", (job.status(), job.logs("stderr"))
        time.sleep(1)
        r = subprocess.run(["scontrol", "requeue", job.job_id], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        st = job.wait(timeout=400)
        assert st.state is JobState.FAILED and st.exit_code == 3, st
        assert "REQUEUE" in subprocess.run(["sacct", "-n", "-D", "-X", "-P", "-o", "State", "-j", job.job_id],
                                           capture_output=True, text=True).stdout
    finally:
        subprocess.run(["scancel", job.job_id], capture_output=True)


SLURM_RUN = Path("/var/tmp/slurm-ci/run")
PYDEB = "127.0.0.1:5443/hpc/pydeb:latest"


def _pid(name: str) -> int:
    return int((SLURM_RUN / f"{name}.pid").read_text().strip())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _stop(name: str) -> None:
    """Stop a daemon the testbed started, by the PID it recorded, and wait until it is gone."""
    pid = _pid(name)
    os.kill(pid, signal.SIGKILL if name.startswith("slurmd-") else signal.SIGTERM)
    deadline = time.time() + 30
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(pid), f"{name} (pid {pid}) still runs"


def _start(argv: List[str], name: str) -> None:
    """Start a Slurm daemon again (it daemonizes and records its PID where the testbed's
    scripts look); close_fds (subprocess's default) keeps the callers' lock files out of it."""
    try:
        if _alive(_pid(name)):
            return
    except (OSError, ValueError):
        pass
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, close_fds=True, timeout=60)


def _nodes_idle(timeout: float = 90) -> Dict[str, str]:
    """Wait until every node is idle (a node DOWN for not responding is resumed)."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        if states and all(v == "idle" for v in states.values()) or time.time() > deadline:
            return states
        for node, st in states.items():
            if st.rstrip("*~#$@") in ("down", "drain", "drng", "fail"):
                subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"],
                               capture_output=True)
        time.sleep(0.5)


def test_a_node_that_dies_under_a_two_node_job_ends_it_node_fail(client: Client, slurm: Slurm) -> None:
    """Issue 12 item 4: slurmd of c2 killed (SIGKILL) while a two-node job runs on c1 and c2.
    The testbed's SlurmdTimeout is 20 s: slurmctld marks c2 DOWN and ends the job NODE_FAIL
    (30-60 s after the kill). ``--no-requeue``: by default Slurm would requeue the batch job
    (and ``wait()`` follow it, as in the requeue test). Nothing of the job is left running."""
    job = client.submit(IMAGE, ["sh", "-c", 'echo "up $SLURMD_NODENAME"; sleep 300'], runtime=FAST,
                        scheduler=slurm, nodes=2, ntasks_per_node=1, job_name="node-fail",
                        extra_directives=("--no-requeue",))
    try:
        deadline = time.time() + 60
        while job.logs().count("up ") < 2 and time.time() < deadline:
            time.sleep(0.3)
        assert sorted(job.logs().splitlines()) == ["up c1", "up c2"], job.logs("stderr")
        _stop("slurmd-c2")
        killed = time.time()
        st = job.wait(timeout=120)
        took = time.time() - killed
        assert (st.state, st.native_state) == (JobState.FAILED, "NODE_FAIL"), (st, took)
        assert "a node of the job failed" in (st.reason or "") and st.shell_exit_code() != 0, st
        # 0:0 now; 0:15 once c2's slurmd is back and kills the steps it lost (most runs)
        row = sacct_row(job.job_id, "State,ExitCode,NodeList")
        assert row.startswith("NODE_FAIL|0:") and row.endswith("|c[1-2]"), row
    finally:
        subprocess.run(["scancel", job.job_id], capture_output=True)
        _start(["slurmd", "-N", "c2"], "slurmd-c2")
        nodes = _nodes_idle()
    assert nodes == {"c1": "idle", "c2": "idle"}, nodes
    deadline = time.time() + 30      # c2's slurmd, back, kills the steps of the job it lost
    while time.time() < deadline and subprocess.run(
            ["pgrep", "-f", f"slurmstepd: \\[{job.job_id}\\."], capture_output=True).returncode == 0:
        time.sleep(0.5)
    left = subprocess.run(["pgrep", "-af", f"slurmstepd: \\[{job.job_id}\\."], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def test_slurmdbd_stopped_while_wait_runs(client: Client, work_dir: Path) -> None:
    """Issue 12 item 4: slurmdbd stopped while a job runs and ``wait()`` polls. sacct fails
    ("Problem talking to the database: Connection refused"); slurmctld answers meanwhile (the
    status of the running job, then its end), and once slurmdbd is back sacct has the same
    final state (slurmctld sends it the records it kept; until then sacct says RUNNING)."""
    s = Slurm(settings=SlurmSettings(work_dir=str(work_dir), poll_initial=0.25, poll_cap=2.0))
    job = client.submit(IMAGE, ["sh", "-c", "sleep 8; exit 5"], runtime=FAST, scheduler=s,
                        job_name="no-slurmdbd")
    result: Dict[str, object] = {}
    try:
        deadline = time.time() + 60
        while job.status().state is not JobState.ACTIVE and time.time() < deadline:
            time.sleep(0.3)
        _stop("slurmdbd")
        waiter = threading.Thread(target=lambda: result.update(st=s.attach(job.job_id).wait(timeout=120)))
        waiter.start()
        meanwhile = job.status()
        assert (meanwhile.state, meanwhile.source) == (JobState.ACTIVE, "scontrol"), meanwhile
        down = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job.job_id], capture_output=True, text=True)
        assert down.returncode != 0 and "Connection refused" in down.stderr, down
        waiter.join(timeout=150)
        st = result["st"]
        assert (st.state, st.exit_code, st.source) == (JobState.FAILED, 5, "scontrol"), st  # type: ignore[attr-defined]
    finally:
        _start(["slurmdbd"], "slurmdbd")
    # sacct answers again at once, first with what it had (RUNNING) until slurmctld has sent
    # it the records it kept while slurmdbd was away
    back = time.time()
    deadline = back + 120
    after = job.status()
    while not (after.source == "sacct" and after.final) and time.time() < deadline:
        time.sleep(1)
        after = job.status()
    print(f"sacct final {time.time() - back:.1f} s after slurmdbd was started again")
    assert (after.state, after.exit_code, after.source) == (JobState.FAILED, 5, "sacct"), after
    assert sacct_row(job.job_id) == "FAILED|5:0"
    assert _nodes_idle() == {"c1": "idle", "c2": "idle"}


def test_a_job_over_its_mem_ends_out_of_memory(cache: Path, work_dir: Path) -> None:
    """Issue 12 item 4: --mem enforced by task/cgroup (testbed: SLURM_CI_CGROUP=auto). The
    kernel's OOM killer ends the container's python; Slurm records OUT_OF_MEMORY, and
    ``submit --wait`` fails with the killed command's 137 and says why. Takes about 4 s."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    if "task/cgroup" not in config:
        pytest.skip("--mem is not enforced on this testbed (slurm-start.sh SLURM_CI_CGROUP=0: "
                    "only Slurm 22.05 on cgroup v1 was tested)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env.update(NSDF_HPC_CACHE=str(cache), NSDF_HPC_SLURM_DIR=str(work_dir))
    r = subprocess.run([sys.executable, "-m", "nsdf_hpc", "submit", "--wait", "--mem", "200M", "-r", FAST,
                        "-J", "oom", PYDEB, "--", "python3", "-c",
                        "print('allocating', flush=True); x = bytearray(600 * 1024 * 1024); print('not reached')"],
                       env=env, capture_output=True, text=True, timeout=300, cwd="/tmp")
    job_id = r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
    assert job_id.isdigit(), (r.stdout, r.stderr)
    assert r.returncode == 137, (r.returncode, r.stderr)
    assert f"{job_id} FAILED OUT_OF_MEMORY exit=137 (the job used more memory" in r.stderr, r.stderr
    # Slurm's record: 0:125 (its OOM marker) whatever the script returned; 137 is the
    # command's own status, from the job's exit-code file
    assert sacct_row(job_id) == "OUT_OF_MEMORY|0:125"
    st = Slurm(settings=SlurmSettings(work_dir=str(work_dir))).attach(job_id).status()
    assert (st.state, st.native_state, st.exit_code, st.signal) == (JobState.FAILED, "OUT_OF_MEMORY", 137, None)
    log = Slurm(settings=SlurmSettings(work_dir=str(work_dir))).attach(job_id).logs()
    assert "allocating" in log and "not reached" not in log, log


def test_cli_submit_wait_status_logs_cancel(cache: Path, work_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env.update(NSDF_HPC_CACHE=str(cache), NSDF_HPC_SLURM_DIR=str(work_dir))
    cli = [sys.executable, "-m", "nsdf_hpc"]

    def run(*args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120, cwd="/tmp")
    dry = run("submit", "--dry-run", "-r", FAST, "-N", "2", "-J", "cli job", "--time", "5",
              IMAGE, "--", "echo", "$(hi)")
    assert dry.returncode == 0 and '#SBATCH --job-name="cli job"' in dry.stdout
    assert "#SBATCH --nodes=2" in dry.stdout and "'$(hi)'" in dry.stdout
    r = run("submit", "--wait", "-r", FAST, "-e", "X=7", IMAGE, "--", "sh", "-c", 'echo "x=$X"; exit 3')
    assert r.returncode == 3, r.stderr
    job_id = r.stdout.strip()
    assert job_id.isdigit() and "FAILED" in r.stderr
    st = run("status", "--json", job_id)
    assert st.returncode == 0 and json.loads(st.stdout)[0]["state"] == "FAILED"
    assert json.loads(st.stdout)[0]["exit_code"] == 3
    assert run("logs", job_id).stdout == "x=7\n"
    assert run("logs", "--follow", job_id).stdout == "x=7\n"
    sub = run("submit", "-r", FAST, IMAGE, "--", "sleep", "60")
    jid = sub.stdout.strip()
    assert run("cancel", jid).returncode == 0
    st = Slurm(settings=SlurmSettings(work_dir=str(work_dir))).attach(jid).wait(timeout=30)
    assert st.state is JobState.CANCELED
    assert "CANCELED" in run("status", jid).stdout


def _rpc_counts() -> Dict[str, int]:
    """The daemons' own counters of status queries: slurmctld's job-info RPCs (``sdiag``) and
    slurmdbd's job queries (``sacctmgr show stats``)."""
    import re
    out = {}
    for name, argv, rpcs in (("slurmctld", ["sdiag"], ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE")),
                             ("slurmdbd", ["sacctmgr", "show", "stats"], ("DBD_GET_JOBS_COND",))):
        text = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        out[name] = sum(int(m.group(1)) for r in rpcs
                        for m in [re.search(rf"^\s*{r}\s+\(\s*\d+\)\s+count:(\d+)", text, re.M)] if m)
    return out


def test_cli_status_of_a_job_nsdf_hpc_did_not_submit_is_one_query(work_dir: Path, tmp_path: Path) -> None:
    """`nsdf-run status` of a plain sbatch job asks slurmdbd once and slurmctld not at all (it
    asked `scontrol show job` for log paths it does not print, 2026-12-02); `logs` still finds
    the job's output through slurmctld."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env.update(NSDF_HPC_SLURM_DIR=str(work_dir))
    out = subprocess.run(["sbatch", "--parsable", "--wait", "-o", str(tmp_path / "foreign-%j.out"),
                          "--wrap", "echo foreign"], capture_output=True, text=True, timeout=120, check=True)
    jid = out.stdout.strip().split(";")[0]
    for _ in range(3):
        before = _rpc_counts()
        st = subprocess.run([sys.executable, "-m", "nsdf_hpc", "status", jid], env=env, capture_output=True,
                            text=True, timeout=60, cwd="/tmp")
        after = _rpc_counts()
        assert st.returncode == 0 and st.stdout.startswith(f"{jid}\tCOMPLETED\tCOMPLETED exit=0"), st
        assert {k: after[k] - before[k] for k in after} == {"slurmctld": 0, "slurmdbd": 1}
    logs = subprocess.run([sys.executable, "-m", "nsdf_hpc", "logs", jid], env=env, capture_output=True,
                          text=True, timeout=60, cwd="/tmp")
    assert (logs.returncode, logs.stdout) == (0, "foreign\n"), logs.stderr


def test_cli_status_fast_path_prints_what_the_click_command_prints(work_dir: Path, tmp_path: Path) -> None:
    """Once the click command validated the Slurm settings, `nsdf-run status N` is answered
    without the settings models (``_status.py``: no pydantic import) and prints what the click
    command prints, for real jobs that completed, failed, died of a signal, were cancelled,
    are held or still run; array jobs and array tasks are left to the click command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env.update(NSDF_HPC_SLURM_DIR=str(work_dir), HOME=str(tmp_path / "home"),
               XDG_CACHE_HOME=str(tmp_path / "xdg-cache"))

    def sbatch(*args: str) -> str:
        out = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args], capture_output=True,
                             text=True, timeout=60, check=True)
        return out.stdout.strip().split(";")[0]

    def status(*ids: str, full: bool = False) -> "tuple[str, bool]":
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nsdf_hpc", "status", *ids],
                           env={**env, **({"NSDF_HPC_NO_FAST_PATH": "1"} if full else {})},
                           capture_output=True, text=True, timeout=60, cwd="/tmp")
        errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
        assert r.returncode == 0 and not errors, r
        return r.stdout, any(line.startswith("import time:") and line.split("|")[-1].strip() == "pydantic"
                             for line in r.stderr.splitlines())

    ok, bad, killed = sbatch("--wrap", "true"), sbatch("--wrap", "exit 3"), sbatch("--wrap", "kill -KILL $$")
    running, cancelled = sbatch("--wrap", "sleep 120"), sbatch("--wrap", "sleep 120")
    array, held = sbatch("--array=0-2", "--wrap", "true"), sbatch("--hold", "--wrap", "true")
    slurm = Slurm(settings=SlurmSettings(work_dir=str(work_dir)))
    try:
        slurm.cancel([cancelled])
        slurm.wait_all([slurm.attach(j) for j in (ok, bad, killed, cancelled, array)], timeout=90)
        deadline = time.time() + 60
        while slurm.attach(running).status().state is not JobState.ACTIVE and time.time() < deadline:
            time.sleep(0.5)
        first = status(ok)                       # no stamp yet: the click command, which writes it
        assert first[1] and (tmp_path / "xdg-cache" / "nsdf-hpc" / "slurm-valid").is_file()
        plain = [ok, bad, killed, cancelled, running, held]
        for ids in [[j] for j in plain] + [plain, [bad, ok, bad]]:
            fast, full = status(*ids), status(*ids, full=True)
            assert not fast[1] and full[1], (ids, fast)
            assert fast[0] == full[0] and len(fast[0].splitlines()) == len(ids), (fast, full)
        assert "\tFAILED\tFAILED exit=3" in status(bad)[0] and "\tACTIVE\tRUNNING" in status(running)[0]
        for ids in ([array], [f"{array}_1"], [ok, array]):
            fast, full = status(*ids), status(*ids, full=True)
            assert fast[1] and fast[0] == full[0], (ids, fast, full)
    finally:
        slurm.cancel([running, held])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_a_signal_to_submit_wait_stops_the_waiting_and_says_how_to_cancel(cache: Path, work_dir: Path,
                                                                         sig: int) -> None:
    """Ctrl-C (or kill) on `submit --wait` ends nsdf-run with 128+N; the job goes on in Slurm,
    and the message names the command that ends it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env.update(NSDF_HPC_CACHE=str(cache), NSDF_HPC_SLURM_DIR=str(work_dir))
    proc = subprocess.Popen([sys.executable, "-m", "nsdf_hpc", "submit", "--wait", "-r", FAST, IMAGE,
                             "--", "sleep", "120"], env=env, cwd="/tmp", stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    jid = ""
    try:
        assert proc.stdout is not None
        jid = proc.stdout.readline().strip()          # printed before the waiting starts
        assert jid.isdigit(), jid
        time.sleep(1)
        proc.send_signal(sig)
        _, err_text = proc.communicate(timeout=30)
        assert proc.returncode == 128 + sig, err_text
        assert f"Slurm job {jid} goes on (`nsdf-run cancel {jid}` ends it)" in err_text, err_text
        state = Slurm(settings=SlurmSettings(work_dir=str(work_dir))).attach(jid).status().state
        assert state in (JobState.QUEUED, JobState.ACTIVE), state
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if jid.isdigit():
            subprocess.run(["scancel", jid], check=False)


def test_batch_wrapper_example_runs_nsdf_run_in_the_allocation(cache: Path, work_dir: Path) -> None:
    example = ROOT / "examples" / "slurm_batch_wrapper.sbatch"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSDF_HPC_", "SLURM_", "SBATCH_"))}
    env.update(NSDF_HPC_CACHE=str(cache), NSDF_HPC_RUNTIME=FAST,
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    pull = subprocess.run([sys.executable, "-m", "nsdf_hpc", "pull", IMAGE], env=env,
                          capture_output=True, text=True, timeout=300)
    assert pull.returncode == 0, pull.stderr
    out = work_dir / "wrapper.out"
    r = subprocess.run(["sbatch", "--parsable", "--wait", f"--output={out}", str(example)],
                       env=env, capture_output=True, text=True, timeout=120, cwd=str(work_dir))
    text = out.read_text() if out.exists() else ""
    assert r.returncode == 0, (r.stderr, text)
    lines = text.splitlines()
    assert "batch step in a container" in lines
    assert sorted(x for x in lines if x.startswith("rank ")) == ["rank 0 of 2 on c1", "rank 1 of 2 on c2"]


def test_zz_time_limit_is_a_failure_even_with_exit_code_0(timeout_job: Job) -> None:
    st = timeout_job.wait(timeout=150)
    assert st.state is JobState.FAILED and st.native_state == "TIMEOUT", st
    assert st.exit_code == 0 and st.shell_exit_code() != 0
