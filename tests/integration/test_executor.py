"""nsdf_hpc.Executor on the testbed: Python functions in hpc/pydeb (Debian 12's python3 3.11.2;
the test interpreter must be 3.11 too, which the guard test checks) on every real runtime, as
root and as the unprivileged user, and as array jobs on the two-node Slurm cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

import nsdf_hpc
from nsdf_hpc import executor as executor_mod
from nsdf_hpc.client import Client
from nsdf_hpc.schedulers import JobState, Slurm, SlurmSettings

from .helpers import PYDEB, RUNTIME_PARAMS, root_env, user_cache

pytestmark = [pytest.mark.integration, pytest.mark.registry]

REG = PYDEB.split("/", 1)[0]   # the TLS registry
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def square_and_print(x: int) -> int:
    print("squaring", x)
    return x * x


def fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"no threes ({x})")
    return x + 100


def kill_self() -> None:
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def client(shared_cache: Path) -> Client:
    return Client(env=root_env(shared_cache))


@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_local_calls_results_exceptions_and_a_killed_container(runtime: str, client: Client,
                                                                 tmp_path: Path) -> None:
    with nsdf_hpc.Executor(PYDEB, runtime=runtime, client=client, bind_cwd=False,
                           work_dir=str(tmp_path)) as ex:
        # a lambda closing over a local: cloudpickle sends it by value
        offset = 5
        f = ex.submit(lambda x: x + offset, 37)
        assert f.result(timeout=300) == 42
        # map keeps the order; stdout of each call is on its future
        futs = ex.map_futures(square_and_print, [3, 1, 2])
        assert [g.result(timeout=300) for g in futs] == [9, 1, 4]
        assert [g.stdout for g in futs] == ["squaring 3\n", "squaring 1\n", "squaring 2\n"]
        # the exception's own type, the remote traceback as its cause
        with pytest.raises(ValueError, match="no threes") as info:
            ex.submit(fails_on_three, 3).result(timeout=300)
        cause = info.value.__cause__
        assert isinstance(cause, nsdf_hpc.errors.RemoteTraceback) and "fails_on_three" in cause.text
        # a call whose process is killed: a clear error (status, how, where), not a hang
        with pytest.raises(nsdf_hpc.WorkerDiedError) as died:
            ex.submit(kill_self).result(timeout=300)
        assert died.value.returncode == 137 and "killed by signal 9 (SIGKILL, status 137)" in str(died.value)
        assert runtime in str(died.value)
    assert not any(tmp_path.iterdir()), "the work directory is removed on exit"


@pytest.mark.apptainer
def test_the_guard_stops_a_mismatch_before_anything_runs(client: Client, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # the real image's Python matches the test interpreter's major.minor (3.11)
    with nsdf_hpc.Executor(PYDEB, runtime="apptainer", client=client, bind_cwd=False,
                           work_dir=str(tmp_path)) as ex:
        assert ex.submit(len, "abc").result(timeout=300) == 3
        assert ex.image_python is not None and ex.image_python[:2] == sys.version_info[:2]
    known = json.loads((Path(client.cache.root) / "python-versions.json").read_text())
    assert any(k.endswith(" python3") and v.startswith("3.11.") for k, v in known.items())
    # a host that pickles with another Python: refused, naming both versions and python=
    monkeypatch.setattr(executor_mod, "host_python", lambda: (3, 9, 18))
    ex = nsdf_hpc.Executor(PYDEB, runtime="apptainer", client=client, bind_cwd=False,
                           work_dir=str(tmp_path))
    with pytest.raises(nsdf_hpc.InterpreterMismatchError) as info:
        ex.submit(len, "abc")
    assert "3.9.18" in str(info.value) and "3.11." in str(info.value) and "python=" in str(info.value)
    assert not any(tmp_path.iterdir()), "nothing was written or run"
    # an interpreter the image does not have: said so, with python=
    ex = nsdf_hpc.Executor(PYDEB, runtime="apptainer", client=client, python="python3.99",
                           bind_cwd=False, work_dir=str(tmp_path))
    with pytest.raises(nsdf_hpc.ExecutorError, match="python3.99"):
        ex.submit(len, "abc")


@pytest.mark.unprivileged
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_example_as_the_unprivileged_user(runtime: str, as_user, user_dir: Path) -> None:  # type: ignore[no-untyped-def]
    # the user venv's interpreter is /usr/bin/python3 (Debian 12: 3.11, as in the image)
    script = user_dir / "executor_map.py"
    script.write_text((EXAMPLES / "executor_map.py").read_text())
    os.chown(script, as_user.pw.pw_uid, as_user.pw.pw_gid)
    r = as_user.run([str(as_user.venv / "bin" / "python"), str(script), "--runtime", runtime,
                     "--items", "3"], cwd=str(user_dir), timeout=600,
                    NSDF_HPC_CACHE=str(user_cache(as_user)), TMPDIR=str(user_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "item 2: 3.1" in r.stdout and "pi ~ 3.1" in r.stdout


# ------------------------------------------------------------------------------ Slurm
@pytest.fixture(scope="module")
def slurm_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    work = Path("/var/tmp/nsdf-scratch") / f"pytest-exec-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    cache = Path("/var/tmp/nsdf-hpc-test-cache") / str(os.getuid())
    client = Client(env=root_env(cache))
    client.__dict__["_slurm"] = Slurm(settings=SlurmSettings(work_dir=str(work), poll_initial=0.25,
                                                             poll_cap=2.0))
    yield client
    if os.environ.get("NSDF_KEEP_JOBS") != "1":
        import shutil
        shutil.rmtree(work, ignore_errors=True)


def item_work(x: int) -> int:
    print("item", x, os.environ.get("SLURM_ARRAY_TASK_ID"))
    if x == 4:
        kill_self()
    if x == 7:
        os._exit(3)
    if x == 8:
        raise ValueError("item eight fails")
    return x * 10


@pytest.mark.slurm
@pytest.mark.apptainer
def test_slurm_map_is_one_array_job_and_a_failed_item_loses_no_other(slurm_client: Client) -> None:
    # three items per task: task 1 is 3, 4 (SIGKILLs its process), 5; task 2 is 6, 7 (os._exit(3)),
    # 8 (raises): the items before and after a dead one keep or get their results
    with nsdf_hpc.Executor(PYDEB, on="slurm", runtime="apptainer", client=slurm_client, bind_cwd=False,
                           batch_size=3, nodes=1, time="0:05") as ex:
        futs = ex.map_futures(item_work, range(10))
        job = ex.jobs[0]
        assert len(ex.jobs) == 1 and job.provenance["indices"] == list(range(4))
        outcomes = {}
        for f in futs:
            try:
                outcomes[f.index] = f.result(timeout=300)
            except Exception as err:  # noqa: BLE001
                outcomes[f.index] = err
    assert [outcomes[i] for i in (0, 1, 2, 3, 5, 6, 9)] == [0, 10, 20, 30, 50, 60, 90]
    killed, exited, raised = outcomes[4], outcomes[7], outcomes[8]
    assert isinstance(killed, nsdf_hpc.WorkerDiedError) and killed.returncode == 137, killed
    assert f"item 4 in Slurm job {job.job_id} task 1 (apptainer" in str(killed)
    assert "killed by signal 9 (SIGKILL, status 137)" in str(killed) and "item 4 1" in killed.log_tail
    assert isinstance(exited, nsdf_hpc.WorkerDiedError) and exited.returncode == 3, exited
    assert "exited with status 3" in str(exited) and "task 2" in str(exited)
    assert isinstance(raised, ValueError) and "item eight fails" in str(raised)
    assert futs[5].stdout == "item 5 1\n" and futs[9].stdout == "item 9 3\n"
    assert list(ex.map(abs, [])) == []


def kill_the_worker(x: int) -> int:
    print("item", x, flush=True)
    if x == 1:
        os.kill(os.getppid(), 9)     # the worker itself: the whole task ends here
        os._exit(0)
    return x


@pytest.mark.slurm
@pytest.mark.apptainer
def test_slurm_a_task_that_dies_as_a_whole_keeps_what_finished(slurm_client: Client) -> None:
    with nsdf_hpc.Executor(PYDEB, on="slurm", runtime="apptainer", client=slurm_client, bind_cwd=False,
                           batch_size=3, time="0:05") as ex:
        futs = ex.map_futures(kill_the_worker, range(3))
        assert futs[0].result(timeout=300) == 0
        errors = []
        for f in futs[1:]:
            with pytest.raises(nsdf_hpc.WorkerDiedError) as died:
                f.result(timeout=300)
            errors.append(died.value)
    job = ex.jobs[0]
    for n, err in zip((1, 2), errors):
        assert f"Slurm job {job.job_id} task 0 ended (" in str(err), err
        assert f"before the worker wrote the result of item {n}" in str(err), err
        assert "that finished before keep their results" in str(err), err
    assert "item 1" in errors[0].log_tail


def allocate(mb: int) -> int:
    print(f"allocating {mb} MB", flush=True)
    return len(bytearray(mb * 1024 * 1024))


@pytest.mark.podman
def test_a_call_killed_for_memory_is_a_clear_error_not_a_hang(client: Client, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """OOM for real: rootful podman gives the container a memory cgroup limit (cgroup v1 here),
    the kernel's OOM killer ends the call's process, and the worker sees the container's
    oom_kill count go up. (A Slurm-level OOM, --mem enforced by task/cgroup, is
    test_slurm_jobs.py's test_a_job_over_its_mem_ends_out_of_memory.)"""
    # podman 4.3.1's conmon (2.1.6) leaves an empty file named "oom" in the current directory
    # after an OOM kill: keep it out of the checkout
    monkeypatch.chdir(tmp_path)
    with nsdf_hpc.Executor(PYDEB, runtime="podman", client=client, bind_cwd=False, work_dir=str(tmp_path),
                           extra_args=("--memory=64m",)) as ex:
        big, small = ex.submit(allocate, 400), ex.submit(allocate, 4)
        with pytest.raises(nsdf_hpc.WorkerDiedError) as died:
            big.result(timeout=300)
        assert small.result(timeout=300) == 4 * 1024 * 1024
    err = died.value
    assert err.returncode == 137 and "killed by signal 9 (SIGKILL, status 137)" in str(err), err
    assert "out-of-memory killer ended it" in str(err) and "podman" in str(err)
    assert "allocating 400 MB" in err.log_tail


@pytest.mark.slurm
@pytest.mark.parametrize("runtime", RUNTIME_PARAMS)
def test_slurm_map_and_submit_on_every_runtime(runtime: str, slurm_client: Client) -> None:
    with nsdf_hpc.Executor(PYDEB, on="slurm", runtime=runtime, client=slurm_client, bind_cwd=False,
                           time="0:05") as ex:
        assert list(ex.map(square_and_print, [2, 3])) == [4, 9]
        assert ex.submit(pow, 2, 10).result(timeout=300) == 1024


@pytest.mark.slurm
@pytest.mark.apptainer
def test_slurm_later_submissions_reuse_the_prepared_job_until_it_no_longer_holds(
        slurm_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first Slurm submission of an Executor is prepared in full; later ones re-use it
    (no pull, no planning), each in a job directory of its own; a working directory that
    changed, or the image gone from the cache (a prune), prepares in full again."""
    pulls = []
    real_pull = slurm_client.pull
    monkeypatch.setattr(slurm_client, "pull", lambda *a, **k: pulls.append(a[0]) or real_pull(*a, **k))
    work = slurm_client.scheduler().settings.work_dir
    with nsdf_hpc.Executor(PYDEB, on="slurm", runtime="apptainer", client=slurm_client, bind_cwd=False,
                           time="0:05") as ex:
        assert ex.submit(pow, 2, 3).result(timeout=300) == 8
        first, pulled = ex._prep, len(pulls)
        assert first is not None
        assert list(ex.map(square_and_print, [2, 3, 4])) == [4, 9, 16]
        assert ex.submit(pow, 3, 2).result(timeout=300) == 9
        assert len(pulls) == pulled                    # re-used: nothing pulled again
        dirs = [j.directory for j in ex.jobs]
        assert len(set(dirs)) == 3
        for job in ex.jobs:
            prov = json.loads(Path(job.directory, "provenance.json").read_text())
            assert prov["job_ids"] == list(job.job_ids) and prov["argv"] == list(first.inputs.prefix)
            assert prov["directory"] == job.directory and prov["script"] == str(Path(job.directory, "job.sh"))
            assert os.path.realpath(os.path.join(work, "by-id", job.job_id)) == job.directory
            assert job.wait(timeout=120).state is JobState.COMPLETED
        assert json.loads(Path(dirs[1], "provenance.json").read_text())["indices"] == [0, 1, 2]
        # another working directory: prepared in full (the job's --chdir is the new one)
        monkeypatch.chdir(tmp_path)
        assert ex.submit(pow, 2, 4).result(timeout=300) == 16
        assert len(pulls) == pulled + 1 and ex._prep is not None and ex._prep.inputs.chdir == str(tmp_path)
        assert f"#SBATCH --chdir={tmp_path}\n" in Path(ex.jobs[-1].directory, "job.sh").read_text()
        # the image gone from the cache: prepared in full, which pulls it again
        sif = ex._prep.inputs.requires[-1]
        os.rename(sif, sif + ".gone")
        try:
            assert ex.submit(pow, 2, 5).result(timeout=300) == 32
        finally:
            if os.path.exists(sif + ".gone"):
                os.unlink(sif + ".gone")
        assert len(pulls) == pulled + 2 and os.path.exists(sif)


def _ahead_ready(slurm: Slurm, timeout: float = 20) -> Any:
    """The ``sbatch`` the backend started ahead, once it waits for its script."""
    deadline = time.monotonic() + timeout
    while (slurm._ahead is None or not slurm._ahead.usable()) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert slurm._ahead is not None and slurm._ahead.usable(), "no sbatch was started ahead"
    return slurm._ahead


@pytest.mark.slurm
@pytest.mark.apptainer
def test_slurm_submissions_go_through_an_sbatch_started_ahead(slurm_client: Client) -> None:
    """The Executor starts the next ``sbatch`` ahead (``Slurm.start_ahead``): the first while
    it prepares, the next ones in its collector. Each job is the script of its directory, read
    by that ``sbatch`` from stdin (Slurm shows no command file), byte for byte; the one left at
    shutdown is ended without a job: the scheduler holds exactly the jobs submitted."""
    name = f"nsdf-ahead-{uuid.uuid4().hex[:8]}"
    slurm = slurm_client.scheduler()
    started = []
    with nsdf_hpc.Executor(PYDEB, on="slurm", runtime="apptainer", client=slurm_client, bind_cwd=False,
                           time="0:05", job_name=name) as ex:
        for n in range(3):
            if n:
                started.append(_ahead_ready(slurm))
            fut = ex.submit(pow, 2, n + 3)
            job = ex.jobs[-1]
            if n:
                assert started[-1].proc.returncode == 0     # that sbatch submitted this job
            show = subprocess.run(["scontrol", "show", "job", "-o", job.job_id], capture_output=True,
                                  text=True).stdout
            assert " Command=(null) " in show, show      # the script came from stdin
            batch = subprocess.run(["scontrol", "write", "batch_script", job.job_id, "-"],
                                   capture_output=True, text=True).stdout
            assert batch == Path(job.directory, "job.sh").read_text()
            assert fut.result(timeout=300) == 2 ** (n + 3)
        last = _ahead_ready(slurm)
    assert slurm._ahead is None and last.proc.returncode is not None   # ended at shutdown
    ids = [j.job_id for j in ex.jobs]
    deadline = time.monotonic() + 30
    while True:
        acct = subprocess.run(["sacct", "-n", "-X", "-P", f"--name={name}", "-S", "now-1hours", "-o", "JobIDRaw"],
                              capture_output=True, text=True).stdout.split()
        if sorted(acct) == sorted(ids) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(acct) == sorted(ids)


@pytest.mark.slurm
@pytest.mark.apptainer
def test_slurm_an_executor_left_without_shutdown_keeps_no_sbatch_ahead(
        slurm_client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Executor dropped without ``shutdown()`` keeps its ``sbatch`` ahead no longer than
    its collector thread, which ends when idle (``_COLLECTOR_IDLE``, here 1 s)."""
    monkeypatch.setattr(executor_mod, "_COLLECTOR_IDLE", 1.0)
    slurm = slurm_client.scheduler()
    ex = nsdf_hpc.Executor(PYDEB, on="slurm", runtime="apptainer", client=slurm_client, bind_cwd=False,
                           time="0:05")
    assert ex.submit(pow, 2, 3).result(timeout=300) == 8
    ahead = _ahead_ready(slurm)
    collector = ex._collector
    assert collector is not None
    collector.join(timeout=30)
    assert not collector.is_alive() and slurm._ahead is None
    assert ahead.proc.returncode is not None          # ended, unused: no job
    assert ex.submit(pow, 2, 4).result(timeout=300) == 16    # a later call starts all again
    ex.shutdown()
    assert slurm._ahead is None


_KILLED_WITH_AN_AHEAD = """
import os, signal, sys, time
import nsdf_hpc
from nsdf_hpc.client import Client
client = Client(env=dict(os.environ))
ex = nsdf_hpc.Executor(sys.argv[1], on="slurm", runtime="apptainer", client=client, bind_cwd=False,
                       time="0:05", job_name=sys.argv[2], extra_directives=["--hold"])
ex.submit(pow, 2, 3)
slurm = client.scheduler()
deadline = time.monotonic() + 20
while (slurm._ahead is None or not slurm._ahead.usable()) and time.monotonic() < deadline:
    time.sleep(0.002)
print(ex.jobs[-1].job_id, slurm._ahead.proc.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slurm
@pytest.mark.apptainer
def test_slurm_a_process_killed_with_an_sbatch_started_ahead_submits_nothing_more(
        slurm_client: Client, shared_cache: Path) -> None:
    """A process SIGKILLed while an ``sbatch`` waits ahead for its script: that sbatch reads
    an empty script and ends, and the scheduler holds only the job the process submitted.
    Five times (the kill comes while the ahead sbatch may still be starting)."""
    work = slurm_client.scheduler().settings.work_dir
    env = root_env(shared_cache, NSDF_HPC_SLURM_DIR=work)
    ids = []
    try:
        for _ in range(5):
            name = f"nsdf-killed-{uuid.uuid4().hex[:8]}"
            r = subprocess.run([sys.executable, "-c", _KILLED_WITH_AN_AHEAD, PYDEB, name], env=env,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == -9, r.stderr
            job_id, pid = r.stdout.split()
            ids.append(job_id)
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not os.path.exists(f"/proc/{pid}"), "the sbatch started ahead lives on"
            queued = subprocess.run(["squeue", "-h", f"--name={name}", "-o", "%i"], capture_output=True,
                                    text=True).stdout.split()
            assert [q.split("_")[0] for q in queued] == [job_id]      # a held array: 7764_[0]
    finally:
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)


_SUBMIT_AND_EXIT = """
import os, sys
import nsdf_hpc
from nsdf_hpc.client import Client
client = Client(env=dict(os.environ))
ex = nsdf_hpc.Executor(sys.argv[1], on="slurm", runtime="apptainer", client=client, bind_cwd=False,
                       time="0:05", extra_directives=["--hold"])
ex.submit(pow, 2, 3)
print(ex.jobs[-1].job_id, ex.jobs[-1].directory, flush=True)
"""


@pytest.mark.slurm
@pytest.mark.apptainer
def test_slurm_a_script_that_submits_and_exits_at_once_leaves_the_jobs_record(
        slurm_client: Client, shared_cache: Path) -> None:
    """An Executor writes a job's record (by-id link, provenance.json, the image's pin) off
    the submission's path, in its collector thread; a process that ends right after
    submitting (no shutdown, no result) still leaves it: the exit flushes what is left. Ten
    times, as it is a race between the collector and the exit."""
    work = slurm_client.scheduler().settings.work_dir
    env = root_env(shared_cache, NSDF_HPC_SLURM_DIR=work)
    ids = []
    try:
        for _ in range(10):
            r = subprocess.run([sys.executable, "-c", _SUBMIT_AND_EXIT, PYDEB], env=env,
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            job_id, directory = r.stdout.split()
            ids.append(job_id)
            assert os.path.realpath(os.path.join(work, "by-id", job_id)) == directory
            prov = json.loads(Path(directory, "provenance.json").read_text())
            assert prov["job_ids"] == [job_id]
            pins = Path(shared_cache, "pins", f"apptainer-{prov['digest'].replace(':', '-')}")
            assert (pins / job_id).exists()
    finally:
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True)


def read_marker() -> str:
    with open("/etc/nsdf-marker") as fh:
        return fh.read().strip()


@pytest.mark.slurm
@pytest.mark.apptainer
@pytest.mark.podman
def test_slurm_calls_run_the_image_resolved_at_setup_when_the_tag_moves(slurm_client: Client) -> None:
    """Each Slurm submission of an Executor names the tag pinned to the digest its setup
    resolved (and checked the interpreter of): a tag pushed again meanwhile changes nothing
    for it, and a new Executor gets the new image."""
    ref = f"{REG}/test/exmove:{uuid.uuid4().hex[:8]}"
    local = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        for v in ("v1", "v2"):
            (Path(d) / "Containerfile").write_text(f"FROM {PYDEB}\nRUN echo {v} > /etc/nsdf-marker\n")
            local[v] = f"localhost/nsdf-exmove:{v}"
            r = subprocess.run(["podman", "build", "-q", "--tls-verify=false", "-t", local[v], d],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr

    def push(v: str) -> None:
        r = subprocess.run(["podman", "push", "-q", "--tls-verify=false", local[v], f"docker://{ref}"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    try:
        push("v1")
        with nsdf_hpc.Executor(ref, on="slurm", runtime="apptainer", client=slurm_client,
                               bind_cwd=False, time="0:05") as ex:
            assert ex.submit(read_marker).result(timeout=300) == "v1"
            push("v2")
            assert ex.submit(read_marker).result(timeout=300) == "v1"
            assert list(ex.map(lambda _: read_marker(), range(2))) == ["v1", "v1"]
        with nsdf_hpc.Executor(ref, on="slurm", runtime="apptainer", client=slurm_client,
                               bind_cwd=False, time="0:05") as ex:
            assert ex.submit(read_marker).result(timeout=300) == "v2"
    finally:
        subprocess.run(["podman", "rmi", *local.values()], capture_output=True)


def sleep_long() -> None:
    time.sleep(600)


@pytest.mark.slurm
@pytest.mark.apptainer
def test_slurm_cancel(slurm_client: Client) -> None:
    ex = nsdf_hpc.Executor(PYDEB, on="slurm", runtime="apptainer", client=slurm_client, bind_cwd=False,
                           time="0:15")
    futs = ex.map_futures(lambda _: sleep_long(), range(2))
    job = ex.jobs[0]
    deadline = time.monotonic() + 120
    while job.status().state is not JobState.ACTIVE and time.monotonic() < deadline:
        time.sleep(1)
    started = time.monotonic()
    ex.cancel()
    assert all(f.cancelled() for f in futs)
    ex.shutdown(wait=True)
    assert time.monotonic() - started < 60
    st = job.wait(timeout=120)
    assert st.state is JobState.CANCELED, st


@pytest.mark.slurm
@pytest.mark.apptainer
def test_the_example_on_slurm(slurm_client: Client) -> None:
    work = slurm_client.__dict__["_slurm"].settings.work_dir
    env = root_env(Path(slurm_client.cache.root), NSDF_HPC_SLURM_DIR=work)
    r = subprocess.run([sys.executable, str(EXAMPLES / "executor_map.py"), PYDEB, "--on", "slurm",
                        "--runtime", "apptainer", "--items", "5"], env=env, cwd="/tmp",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "item 4: 3.1" in r.stdout and "pi ~ 3.1" in r.stdout


@pytest.mark.slurm
@pytest.mark.unprivileged
@pytest.mark.parametrize("runtime", [pytest.param(r, marks=getattr(pytest.mark, r)) for r in ("apptainer", "podman")])
def test_the_example_on_slurm_as_the_unprivileged_user(runtime: str, as_user, user_dir: Path) -> None:  # type: ignore[no-untyped-def]
    script = user_dir / "executor_map.py"
    script.write_text((EXAMPLES / "executor_map.py").read_text())
    os.chown(script, as_user.pw.pw_uid, as_user.pw.pw_gid)
    r = as_user.run([str(as_user.venv / "bin" / "python"), str(script), "--on", "slurm", "--runtime", runtime,
                     "--items", "3"], cwd=str(user_dir), timeout=600,
                    NSDF_HPC_CACHE=str(user_cache(as_user)), NSDF_HPC_SLURM_DIR=str(user_dir / "jobs"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "item 2: 3.1" in r.stdout and "pi ~ 3.1" in r.stdout


@pytest.mark.slurm
@pytest.mark.podman
def test_slurm_an_item_killed_for_memory_leaves_its_batch_mate(slurm_client: Client, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The same OOM on Slurm, from the container's limit (rootful podman --memory); a job
    over Slurm's own --mem is test_slurm_jobs.py's test_a_job_over_its_mem_ends_out_of_memory."""
    monkeypatch.chdir(tmp_path)     # the job runs here; conmon's stray "oom" file lands here
    with nsdf_hpc.Executor(PYDEB, on="slurm", runtime="podman", client=slurm_client, bind_cwd=False,
                           batch_size=2, time="0:05", extra_args=("--memory=64m",)) as ex:
        big, small = ex.map_futures(allocate, [400, 4])
        with pytest.raises(nsdf_hpc.WorkerDiedError) as died:
            big.result(timeout=300)
        assert small.result(timeout=300) == 4 * 1024 * 1024
    err = died.value
    assert err.returncode == 137 and "out-of-memory killer ended it" in str(err), err
    assert f"item 0 in Slurm job {ex.jobs[0].job_id} task 0 (podman" in str(err)
    assert "allocating 400 MB" in err.log_tail
