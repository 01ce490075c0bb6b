"""MPI across two Slurm nodes, one container per rank (issue 10 item 6: recipes/nsdf-mpi).

The image is recipes/nsdf-mpi (Debian's Open MPI 4.1 + mpi4py, linked to Debian's PMIx 4.2,
the library the testbed's Slurm mpi/pmix plugin loads), built by the testbed (step
recipe-images) and served as ``nsdf/mpi:v1.0.0``. Every rank adds ``2**rank`` in an
allreduce, so the sum is ``2**size - 1`` only when each rank took part, and rank 0 prints the
node each rank ran on (c1 and c2: two slurmd on this one machine, so the host name is the
same; SLURMD_NODENAME tells them apart).

Two ways in, on every runtime of the testbed:
* ``srun --mpi=pmix nsdf-run run IMAGE -- ...``: what a hand-written batch script does; the
  rank's ``nsdf-run`` binds Slurm's PMIx server directory at its own path.
* ``submit(mpi="pmix", nodes=2)``: the generated script runs ``srun --mpi=pmix`` and the
  runtime directly in each rank, binding that rank's PMIx server directory the same way.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

from nsdf_hpc.client import Client
from nsdf_hpc.schedulers import Job, JobState, Slurm, SlurmSettings

from .helpers import RUNTIME_PARAMS, root_cache, root_env, user_cache

pytestmark = [pytest.mark.integration, pytest.mark.slurm, pytest.mark.registry, pytest.mark.slow]

IMAGE = "127.0.0.1:5443/nsdf/mpi:v1.0.0"
SCRATCH = Path("/var/tmp/nsdf-scratch")
MPI_RUNTIMES = RUNTIME_PARAMS
#: the unprivileged user's runtimes (podman-hpc as that user runs squashed images only)
USER_RUNTIMES = [p for p in RUNTIME_PARAMS if p.id != "podman-hpc"]


@pytest.fixture(scope="module")
def work_dir() -> Iterator[Path]:
    d = SCRATCH / f"pytest-mpi-{uuid.uuid4().hex[:8]}"
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    yield d
    import shutil
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cache() -> Path:
    return root_cache()


def _check(out: str, ranks: int = 2) -> None:
    """Each rank's line, and rank 0's summary naming both nodes."""
    lines = out.strip().splitlines()
    for r in range(ranks):
        assert any(re.fullmatch(rf"rank {r} of {ranks} on c[12]/\S+: allreduce {(1 << ranks) - 1}", x)
                   for x in lines), out
    summary = [x for x in lines if x.startswith("allreduce ")]
    assert len(summary) == 1, out
    m = re.fullmatch(r"allreduce ok: (\d+) ranks, sum of 2\*\*rank = (\d+), hosts (\S+)", summary[0])
    assert m, out
    assert int(m.group(1)) == ranks and int(m.group(2)) == (1 << ranks) - 1, out
    nodes = sorted(h.split("/")[0] for h in m.group(3).split(","))
    assert nodes == ["c1", "c2"], out


@pytest.mark.parametrize("runtime", MPI_RUNTIMES)
def test_srun_mpi_pmix_runs_one_container_per_rank_on_two_nodes(runtime: str, cache: Path,
                                                                work_dir: Path) -> None:
    env = root_env(cache)
    pulled = subprocess.run([sys.executable, "-m", "nsdf_hpc", "pull", "--runtime", runtime, IMAGE],
                            env=env, capture_output=True, text=True, timeout=900)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    argv: List[str] = ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--mpi=pmix",
                       "--time=5", "--kill-on-bad-exit=1",
                       sys.executable, "-m", "nsdf_hpc", "run", "--runtime", runtime, IMAGE, "--",
                       # without the image's PMIX_MCA_gds=hash: the rank's PMIx client uses
                       # the server's shared-memory store, in the directory nsdf-run binds
                       "env", "-u", "PMIX_MCA_gds", "python3", "/opt/nsdf/allreduce.py"]
    ran = subprocess.run(argv, env=env, cwd=str(work_dir), capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
    _check(ran.stdout)
    # Slurm's PMIx server directory was bound for the rank: no shared-memory store error
    # (unbound, Open MPI goes on with PMIx's hash store after "PMIX ERROR ... gds_ds12_lock")
    assert "PMIX ERROR" not in ran.stderr, ran.stderr[-3000:]


@pytest.mark.parametrize("runtime", MPI_RUNTIMES)
def test_submit_mpi_pmix_on_two_nodes(runtime: str, cache: Path, work_dir: Path) -> None:
    client = Client(env=root_env(cache))
    slurm = Slurm(settings=SlurmSettings(work_dir=str(work_dir), poll_initial=0.25, poll_cap=2.0))
    # as in the srun case: the image's PMIX_MCA_gds=hash unset, the shared-memory store used
    # through the PMIx directory the script binds for each rank
    job = client.submit(IMAGE, ["env", "-u", "PMIX_MCA_gds", "python3", "/opt/nsdf/allreduce.py"],
                        runtime=runtime, scheduler=slurm,
                        nodes=2, ntasks_per_node=1, mpi="pmix", time="0:05", cwd=str(work_dir),
                        job_name=f"nsdf-mpi-{runtime}")
    assert isinstance(job, Job)
    status = job.wait(timeout=300)
    out = job.logs()
    assert status.state is JobState.COMPLETED and status.exit_code == 0, (status, out, job.logs("stderr"))
    _check(out)
    assert "PMIX ERROR" not in job.logs("stderr"), job.logs("stderr")


@pytest.mark.unprivileged
@pytest.mark.parametrize("runtime", USER_RUNTIMES)
def test_srun_mpi_pmix_as_the_unprivileged_user(runtime: str, as_user, tmp_path: Path  # type: ignore[no-untyped-def]
                                                ) -> None:
    """The same job as a user without privileges (rootless Podman, Apptainer's user namespace)."""
    pw = as_user.pw
    work = SCRATCH / f"pytest-mpi-user-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    os.chown(work, pw.pw_uid, pw.pw_gid)
    cache = str(user_cache(as_user) / "mpi")
    try:
        pulled = as_user.run(["nsdf-run", "pull", "--runtime", runtime, IMAGE], cwd=str(work), timeout=900,
                             NSDF_HPC_CACHE=cache)
        assert pulled.returncode == 0, pulled.stderr[-2000:]
        ran = as_user.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--mpi=pmix", "--time=5",
                           "nsdf-run", "run", "--runtime", runtime, IMAGE, "--",
                           "python3", "/opt/nsdf/allreduce.py"], cwd=str(work), timeout=300,
                          NSDF_HPC_CACHE=cache)
        assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
        _check(ran.stdout)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
