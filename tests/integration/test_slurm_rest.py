"""The REST backend against the testbed's real slurmrestd (Slurm 22.05.8, API v0.0.38, JWT,
2 nodes, slurmdbd): the same kinds of jobs as test_slurm_jobs.py, submitted, watched and
cancelled over HTTP only, as root and as the unprivileged user.

The jobs are the same batch scripts the command backend submits (submit.py renders them);
only the transport differs. The token comes from ``scontrol token`` (stdout, never argv).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator

import pytest

from nsdf_hpc.client import Client
from nsdf_hpc.errors import SchedulerError, SubmitError
from nsdf_hpc.schedulers import Job, JobState, JobStatus, SlurmSettings
from nsdf_hpc.schedulers import rest_api as api
from nsdf_hpc.schedulers.rest import RestSlurm

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.slurmrestd]

SCRATCH = Path("/var/tmp/nsdf-scratch")
FAST = "udocker"
IMAGE = "busybox"
HOSTILE = "we\"ird 'name' $(touch /tmp/pwned) `id` ;|&*?\\ \t#end"


def _token(user: str) -> str:
    out = subprocess.run(["scontrol", "token", f"username={user}", "lifespan=3600"],
                         capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "SLURM_JWT"}).stdout
    return out.strip().split("SLURM_JWT=", 1)[1]


@pytest.fixture(scope="module")
def url(testbed: Dict[str, str]) -> str:
    return testbed["NSDF_TESTBED_SLURMRESTD_URL"]


@pytest.fixture(scope="module")
def token() -> str:
    return _token("root")


@pytest.fixture(scope="module")
def work_dir() -> Iterator[Path]:
    d = SCRATCH / f"pytest-rest-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    yield d
    if os.environ.get("NSDF_KEEP_JOBS") != "1":
        import shutil
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def client() -> Client:
    d = Path("/var/tmp/nsdf-hpc-test-cache") / str(os.getuid())
    d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_") and k != "SLURM_JWT"}
    env["NSDF_HPC_CACHE"] = str(d)
    return Client(env=env)


@pytest.fixture(scope="module")
def rest(work_dir: Path, url: str, token: str) -> RestSlurm:
    settings = SlurmSettings(work_dir=str(work_dir), poll_initial=0.25, poll_cap=2.0, backend="rest",
                             rest_url=url)
    return RestSlurm(settings=settings, env={"SLURM_JWT": token, "USER": "root", "HOME": "/root"})


@pytest.fixture(scope="module")
def timeout_job(client: Client, rest: RestSlurm) -> Job:
    # slurmctld checks time limits about once a minute: submitted first, checked last
    return client.submit(IMAGE, ["sleep", "300"], runtime=FAST, scheduler=rest, time="0:03",
                         job_name="rest-timeout")


def test_00_submit_the_time_limit_job_early(timeout_job: Job) -> None:
    assert timeout_job.job_id.isdigit()


def _no_token_in(directory: Path, token: str) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            assert token.encode() not in p.read_bytes(), p


def test_version_is_discovered_and_doctor_says_which_backend(rest: RestSlurm, url: str, token: str) -> None:
    assert rest.api_version == "v0.0.38" and rest.has_slurmdb and rest.version() == (22, 5)
    env = {**os.environ, "NSDF_HPC_SLURM_BACKEND": "rest", "SLURMRESTD_URL": url, "SLURM_JWT": token}
    out = subprocess.run(["python3", "-m", "nsdf_hpc", "doctor"], capture_output=True, text=True, env=env,
                         cwd=str(Path(__file__).resolve().parents[2])).stdout
    line = next(x for x in out.splitlines() if "Slurm backend" in x)
    assert "Slurm backend: rest (backend = rest (from NSDF_HPC_SLURM_BACKEND))" in line
    assert "Slurm 22.05.8, API v0.0.38, slurmdb endpoints yes" in line and line.startswith("[  ok]")
    assert token not in out


def test_single_job_same_script_status_json_and_no_token_anywhere(
        client: Client, rest: RestSlurm, url: str, token: str, work_dir: Path) -> None:
    job = client.submit(IMAGE, ["sh", "-c", "echo out; echo err >&2; echo $SLURM_JOB_ID"], runtime=FAST,
                        scheduler=rest, job_name="rest-single")
    st = job.wait(timeout=90)
    assert (st.state, st.exit_code, st.source) == (JobState.COMPLETED, 0, "slurmrestd"), st
    assert job.logs().splitlines() == ["out", job.job_id] and job.logs("stderr").strip() == "err"
    script = Path(job.script).read_text()
    assert script.startswith("#!/bin/bash\n#SBATCH --job-name=rest-single\n") and "--export=NIL" in script
    prov = json.loads((Path(job.directory) / "provenance.json").read_text())
    assert prov["job_ids"] == [job.job_id]
    # the CLI over REST: one object per job, with the backend that answered
    env = {**os.environ, "NSDF_HPC_SLURM_BACKEND": "rest", "SLURMRESTD_URL": url, "SLURM_JWT": token,
           "NSDF_HPC_SLURM_DIR": str(work_dir)}
    res = subprocess.run(["python3", "-m", "nsdf_hpc", "status", "--json", job.job_id],
                         capture_output=True, text=True, env=env, cwd=str(Path(__file__).resolve().parents[2]))
    rows = json.loads(res.stdout)
    assert [(r["job_id"], r["state"], r["backend"], r["source"]) for r in rows] == [
        (job.job_id, "COMPLETED", "rest", "slurmrestd")]
    _no_token_in(Path(job.directory), token)
    assert token not in res.stdout + res.stderr


def test_two_node_job_one_container_per_rank(client: Client, rest: RestSlurm) -> None:
    cmd = ["sh", "-c", 'echo "rank=$SLURM_PROCID node=$SLURMD_NODENAME"']
    job = client.submit(IMAGE, cmd, runtime=FAST, scheduler=rest, nodes=2, ntasks_per_node=1,
                        mpi="pmi2", job_name="rest-two-nodes")
    st = job.wait(timeout=90)
    assert st.state is JobState.COMPLETED, (st, job.logs("stderr"))
    # slurmrestd 22.05 ignores nodes=[2, 2]: this fails with one node if the form is wrong
    assert sorted(job.logs().splitlines()) == ["rank=0 node=c1", "rank=1 node=c2"], job.logs("stderr")


def test_array_and_a_chunked_array_with_its_offset_in_the_environment(client: Client, rest: RestSlurm) -> None:
    arr = client.submit_array(IMAGE, template=["sh", "-c", "echo task {index}"], indices="0-3",
                              runtime=FAST, scheduler=rest, job_name="rest-array")
    # index 1500 >= the assumed MaxArraySize 1001: chunk 0-1 remapped, offset 0 via the environment
    far = client.submit_array(IMAGE, commands=[["echo", "first"], ["echo", "far"]], indices=[0, 1500],
                              runtime=FAST, scheduler=rest, job_name="rest-array-far")
    sa, sf = rest.wait_all([arr, far], timeout=120)
    assert (sa.state, sa.tasks, sf.state, sf.tasks) == (JobState.COMPLETED, 4, JobState.COMPLETED, 2), (sa, sf)
    assert [arr.logs(task=i).strip() for i in range(4)] == [f"task {i}" for i in range(4)]
    assert [far.logs(task=i).strip() for i in (0, 1500)] == ["first", "far"]
    assert "NSDF_OFFSET=${1:-${NSDF_ARRAY_OFFSET:-0}}" in Path(far.script).read_text()


def test_dependency_afterok_and_afternotok(client: Client, rest: RestSlurm, work_dir: Path) -> None:
    shared = work_dir / "dep-data"
    shared.mkdir()
    a = client.submit(IMAGE, ["sh", "-c", f"sleep 2; echo A > {shared}/a"], runtime=FAST,
                      scheduler=rest, job_name="rest-dep-a", binds=[str(shared)])
    b = client.submit(IMAGE, ["sh", "-c", f"cat {shared}/a; echo B"], runtime=FAST, scheduler=rest,
                      job_name="rest-dep-b", binds=[str(shared)], dependencies={"afterok": [a]})
    c = client.submit(IMAGE, ["echo", "never"], runtime=FAST, scheduler=rest, job_name="rest-dep-c",
                      dependencies=f"afternotok:{a.job_id}")
    sa, sb, sc = rest.wait_all([a, b, c], timeout=120)
    assert (sa.state, sb.state, sc.state) == (JobState.COMPLETED, JobState.COMPLETED, JobState.CANCELED)
    assert b.logs().splitlines() == ["A", "B"]


def test_cancel_a_running_job(client: Client, rest: RestSlurm) -> None:
    job = client.submit(IMAGE, ["sleep", "300"], runtime=FAST, scheduler=rest, job_name="rest-cancel")
    deadline = time.time() + 60
    while job.status().state is not JobState.ACTIVE and time.time() < deadline:
        time.sleep(0.3)
    job.cancel()
    st = job.wait(timeout=60)
    assert st.state is JobState.CANCELED and st.native_state.startswith("CANCELLED"), st
    rest.cancel([job.job_id])            # again, after the end: not an error


def test_cancel_one_array_task_and_attach_a_foreign_job(client: Client, rest: RestSlurm,
                                                       url: str, token: str, work_dir: Path) -> None:
    sleepy = client.submit_array(IMAGE, template=["sleep", "60"], indices="0-1", runtime=FAST,
                                 scheduler=rest, job_name="rest-array-cancel-one")
    deadline = time.time() + 60
    while sleepy.status().state is not JobState.ACTIVE and time.time() < deadline:
        time.sleep(0.3)
    victim = rest.attach(f"{sleepy.job_id}_1")
    victim.cancel()
    assert victim.wait(timeout=30).state is JobState.CANCELED
    assert rest.attach(f"{sleepy.job_id}_0").status().state in (JobState.QUEUED, JobState.ACTIVE)
    sleepy.cancel()
    assert sleepy.wait(timeout=30).state is JobState.CANCELED
    # a job nsdf-hpc did not submit: its log paths come from GET /slurm/vX/job/ID
    script = work_dir / "foreign.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --output={work_dir}/foreign-%j.out\necho foreign\n")
    jid = rest.sbatch(str(script))
    fresh = RestSlurm(settings=rest.settings, env={"SLURM_JWT": token})
    job = fresh.attach(jid)
    assert job.wait(timeout=60).state is JobState.COMPLETED and job.logs() == "foreign\n"


def test_the_token_is_in_no_process_argv_and_no_job_environment(
        url: str, token: str, work_dir: Path) -> None:
    """While `nsdf-run submit --wait` runs over REST (token in its environment only), no
    process on the machine has the token in its argv, and the job's processes do not have
    it in their environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    env.update(NSDF_HPC_SLURM_BACKEND="rest", SLURMRESTD_URL=url, SLURM_JWT=token,
               NSDF_HPC_SLURM_DIR=str(work_dir),
               NSDF_HPC_CACHE=str(Path("/var/tmp/nsdf-hpc-test-cache") / str(os.getuid())))
    cli = subprocess.Popen(["python3", "-m", "nsdf_hpc", "submit", "--wait", "-r", FAST, "-J", "rest-argv",
                            IMAGE, "--", "sleep", "6"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[2]))
    seen_job = False
    try:
        deadline = time.time() + 60
        while cli.poll() is None and time.time() < deadline:
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    argv = (proc / "cmdline").read_bytes()
                    environ = (proc / "environ").read_bytes()
                except OSError:
                    continue
                assert token.encode() not in argv, argv
                if b"SLURM_JOB_ID=" in environ:
                    seen_job = True
                    assert token.encode() not in environ, argv
            time.sleep(0.5)
        out, err = cli.communicate(timeout=60)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, err
    assert seen_job, "the job's processes were never seen"
    assert token not in out + err


def test_a_failing_jobs_exit_code_from_slurmctld_and_from_slurmdbd(client: Client, rest: RestSlurm) -> None:
    job = client.submit(IMAGE, ["sh", "-c", "exit 7"], runtime=FAST, scheduler=rest, job_name="rest-exit7")
    st = job.wait(timeout=90)
    assert (st.state, st.exit_code, st.source) == (JobState.FAILED, 7, "slurmrestd"), st
    assert st.shell_exit_code() == 7
    # slurmdbd through REST: the state is right, its exit code is the 22.05 bug (0) ...
    raw = rest.send(api.db_jobs_request(rest.api_version, [job.job_id])).json()
    deadline = time.time() + 30
    while not raw.get("jobs") and time.time() < deadline:       # the record lands a moment later
        time.sleep(1)
        raw = rest.send(api.db_jobs_request(rest.api_version, [job.job_id])).json()
    rec = raw["jobs"][0]
    assert rec["state"]["current"] == "FAILED" and rec["exit_code"]["return_code"] == 0
    # ... so the backend takes the exit code from the job's exit-code file
    db = rest.db_status([job.job_id])[job.job_id]
    assert (db.state, db.exit_code, db.source) == (JobState.FAILED, 7, "slurmrestd-slurmdb"), db


def test_hostile_job_name_and_environment(client: Client, rest: RestSlurm, token: str) -> None:
    job = client.submit(IMAGE, ["sh", "-c", 'printf "%s\\n" "$WEIRD"'], runtime=FAST, scheduler=rest,
                        job_name=HOSTILE.replace("\t", " "), env={"WEIRD": HOSTILE})
    st = job.wait(timeout=90)
    assert st.state is JobState.COMPLETED, (st, job.logs("stderr"))
    assert job.logs() == HOSTILE + "\n"
    assert st.name == HOSTILE.replace("\t", " ")        # as slurmctld holds it
    assert not Path("/tmp/pwned").exists()
    _no_token_in(Path(job.directory), token)


def test_status_of_many_jobs_is_one_request(rest: RestSlurm, work_dir: Path) -> None:
    script = work_dir / "held.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --job-name=rest-held\n#SBATCH --hold\n"
                      f"#SBATCH --output={work_dir}/held-%j.out\ntrue\n")
    ids = [rest.sbatch(str(script)) for _ in range(25)]
    try:
        before = rest.requests
        table = rest.status(ids)
        assert rest.requests - before == 1
        assert {table[i].state for i in ids} == {JobState.QUEUED}
        assert {table[i].reason for i in ids} == {"JobHeldUser"}
    finally:
        rest.cancel(ids)
    assert {s.state for s in rest.status(ids).values()} == {JobState.CANCELED}


def test_errors_unreachable_and_refused_token(work_dir: Path, url: str, token: str) -> None:
    s = SlurmSettings(work_dir=str(work_dir), rest_url="http://127.0.0.1:1", submit_retries=1)
    down = RestSlurm(settings=s, env={"SLURM_JWT": token})
    with pytest.raises(SchedulerError, match="did not answer.*connection refused") as info:
        down.status(["1"])
    assert getattr(info.value, "transient", False) and token not in str(info.value)
    script = work_dir / "x.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    with pytest.raises(SubmitError) as sub:
        down.sbatch(str(script))
    assert sub.value.transient
    bad = RestSlurm(settings=s.model_copy(update={"rest_url": url}), env={"SLURM_JWT": "not-a-token"})
    with pytest.raises(SchedulerError, match="scontrol token") as info2:
        bad.status(["1"])
    assert "not-a-token" not in str(info2.value)


@pytest.mark.unprivileged
def test_as_the_unprivileged_user(as_user, user_dir: Path, url: str) -> None:  # type: ignore[no-untyped-def]
    """hpcuser submits over REST with its own token (read from a 0600 file, never argv)."""
    tok = _token(as_user.user)
    tok_file = user_dir / "token.env"
    tok_file.write_text(f"SLURM_JWT={tok}\nexport SLURM_JWT\n")
    os.chown(tok_file, as_user.pw.pw_uid, as_user.pw.pw_gid)
    os.chmod(tok_file, 0o600)
    jobs = user_dir / "jobs"
    run = ('. "$1"; shift; exec "$@"')
    res = as_user.run(["sh", "-c", run, "sh", str(tok_file), "nsdf-run", "submit", "--runtime", FAST,
                       "--job-name", "rest-user", "--wait", IMAGE, "sh", "-c", "id -un; exit 3"],
                      cwd=str(user_dir), NSDF_HPC_SLURM_BACKEND="rest", SLURMRESTD_URL=url,
                      NSDF_HPC_SLURM_DIR=str(jobs), NSDF_HPC_CACHE=str(user_dir / "cache"))
    assert res.returncode == 3, res.stdout + res.stderr
    job_id = res.stdout.splitlines()[0].strip()
    show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    assert f"UserId={as_user.user}(" in show
    assert tok not in res.stdout + res.stderr
    _no_token_in(jobs, tok)


def test_slurmctld_and_slurmrestd_restarted_while_wait_runs(client: Client, rest: RestSlurm) -> None:
    """The testbed's Slurm is restarted the way test_slurm_jobs.py does it (slurm-start.sh
    with testbed.sh's settings): the REST wait rides over the refused connections."""
    root = Path(__file__).resolve().parents[2]
    job = client.submit(IMAGE, ["sh", "-c", "sleep 8; exit 5"], runtime=FAST, scheduler=rest,
                        job_name="rest-restart")
    deadline = time.time() + 30
    while job.status().state is not JobState.ACTIVE and time.time() < deadline:
        time.sleep(0.3)
    result: Dict[str, JobStatus] = {}
    waiter = threading.Thread(target=lambda: result.update(st=rest.attach(job.job_id).wait(timeout=150)))
    waiter.start()
    os.kill(int(Path("/var/tmp/slurm-ci/run/slurmctld.pid").read_text().strip()), signal.SIGTERM)
    time.sleep(3)
    env = {**os.environ, "SLURM_CI_ROOT": "/var/tmp/slurm-ci", "SLURM_CI_NODES": "2",
           "SLURM_CI_ACCOUNTING": "slurmdbd", "SLURM_CI_CPUS": "16", "SLURM_CI_MIN_JOB_AGE": "600",
           "SLURM_CI_RESTD": "1"}
    env.pop("SLURM_JWT", None)
    r = subprocess.run(["bash", str(root / "tests/testbed/slurm-start.sh")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    waiter.join(timeout=170)
    st = result["st"]
    assert st.state is JobState.FAILED and st.exit_code == 5, st


def test_zz_time_limit_is_a_failure_even_with_exit_code_0(timeout_job: Job) -> None:
    st = timeout_job.wait(timeout=150)
    assert st.state is JobState.FAILED and st.native_state == "TIMEOUT", st
    assert st.shell_exit_code() != 0
