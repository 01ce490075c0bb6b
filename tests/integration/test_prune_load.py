"""Issue 12 item 5: ``nsdf-run prune`` while containers use cached images.

Eight real containers (two per runtime: apptainer, charliecloud, podman, udocker; the first of
each pair planned, the second from the launch record) run ``sleep N`` from cached busybox
entries while ``prune --older-than 0`` and ``prune --max-size 0`` run. Every entry in use is
kept (and said so), the unused one is removed and its bytes freed; the containers then end as
their signal says (143), not from a missing image. A Slurm task holds its image the same way.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from nsdf_hpc.cache import ImageCache

from .helpers import BUSYBOX, PYDEB, nsdf_root, root_env

pytestmark = [pytest.mark.integration, pytest.mark.registry]
RUNTIMES = ["apptainer", "charliecloud", "podman", "udocker"]
MARKS = [pytest.mark.apptainer, pytest.mark.charliecloud, pytest.mark.podman, pytest.mark.udocker]


@pytest.fixture()
def cache() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nsdf-prune-load-", dir="/var/tmp"))
    try:
        yield d
    finally:
        nsdf_root(["prune", "--max-size", "0"], d)        # podman's store names go too
        shutil.rmtree(d, ignore_errors=True)


def _du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _sleeps(n: str) -> List[int]:
    """PIDs whose command line is ``sleep N`` (whole words, never the PID column)."""
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    found = []
    for line in ps.splitlines():
        pid, _, args = line.strip().partition(" ")
        words = args.split()
        if len(words) >= 2 and words[-2].rsplit("/", 1)[-1] == "sleep" and words[-1] == n:
            found.append(int(pid))
    return found


def _start(runtime: str, cache: Path, n: str) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([sys.executable, "-m", "nsdf_hpc", "run", "-r", runtime, "--no-bind-cwd",
                             BUSYBOX, "--", "sleep", n], env=root_env(cache), cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.apptainer
@pytest.mark.charliecloud
@pytest.mark.podman
@pytest.mark.udocker
def test_prune_keeps_every_image_a_running_container_uses_and_frees_the_rest(cache: Path) -> None:
    for rt in RUNTIMES:
        r = nsdf_root(["pull", "-r", rt, BUSYBOX], cache)
        assert r.returncode == 0, r.stderr
        # the first run plans and saves the launch record; the second below reuses it
        r = nsdf_root(["run", "-r", rt, "--no-bind-cwd", BUSYBOX, "--", "true"], cache, cwd="/")
        assert r.returncode == 0, r.stderr
    r = nsdf_root(["pull", "-r", "apptainer", PYDEB], cache)        # the one nobody uses
    assert r.returncode == 0, r.stderr
    ic = ImageCache(str(cache))
    entries = {(e.runtime, e.data.get("source")): e for e in ic.entries()}
    unused = entries[("apptainer", PYDEB)]
    unused_path, unused_size = Path(unused.path), _du(Path(unused.path))
    assert unused_size > 10 * 2**20, unused_size

    runs: List[Tuple[str, str, "subprocess.Popen[bytes]"]] = []
    try:
        for rt in RUNTIMES:
            for way in ("planned", "record"):
                n = str(20000 + uuid.uuid4().int % 9000)
                env_extra = {"NSDF_HPC_NO_FAST_PATH": "1"} if way == "planned" else {}
                proc = subprocess.Popen([sys.executable, "-m", "nsdf_hpc", "run", "-r", rt, "--no-bind-cwd",
                                         BUSYBOX, "--", "sleep", n], env=root_env(cache, **env_extra),
                                        cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
                runs.append((rt, n, proc))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(_sleeps(n) for _, n, _ in runs):
            time.sleep(0.2)
        assert all(_sleeps(n) for _, n, _ in runs), [(rt, n, p.poll()) for rt, n, p in runs]
        before = _du(cache)

        dry = nsdf_root(["prune", "--dry-run", "--max-size", "0"], cache)
        assert dry.returncode == 0, dry.stderr
        assert dry.stdout.count("would remove ") == 1 + 1 and PYDEB in dry.stdout, dry.stdout

        by_age = nsdf_root(["prune", "--older-than", "0"], cache)
        assert by_age.returncode == 0, by_age.stderr
        assert by_age.stdout.count("removed ") == 1 + 1 and PYDEB in by_age.stdout, by_age.stdout
        assert by_age.stderr.count("in use by a running container") == len(RUNTIMES), by_age.stderr
        assert not unused_path.exists()
        freed = before - _du(cache)
        assert freed >= unused_size * 0.99, (freed, unused_size)

        by_size = nsdf_root(["prune", "--max-size", "0"], cache)
        assert by_size.returncode == 0, by_size.stderr
        assert "removed 0 entries" in by_size.stdout, by_size.stdout
        assert by_size.stderr.count("in use by a running container") == len(RUNTIMES), by_size.stderr
        for rt in RUNTIMES:
            assert any(e.runtime == rt for e in ic.entries()), f"{rt}'s entry was removed while in use"
        assert all(p.poll() is None for _, _, p in runs), [(rt, p.poll()) for rt, _, p in runs]

        for _, _, proc in runs:
            proc.send_signal(signal.SIGTERM)
        codes = {(rt, n): (proc.wait(timeout=60), proc.stderr.read().decode(errors="replace") if proc.stderr else "")
                 for rt, n, proc in runs}
        assert all(rc == 128 + signal.SIGTERM for rc, _ in codes.values()), codes
    finally:
        for _, n, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pid in _sleeps(n):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    # nothing uses them now: all go, and podman's store forgets them too
    r = nsdf_root(["prune", "--max-size", "0"], cache)
    assert r.returncode == 0 and f"removed {len(RUNTIMES)} entries" in r.stdout, (r.stdout, r.stderr)
    assert ImageCache(str(cache)).entries() == []
    assert _du(cache / "entries") == 0
    left = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                          capture_output=True, text=True).stdout
    podman_entry = entries[("podman", BUSYBOX)]
    assert podman_entry.location not in left, left


@pytest.mark.slurm
@pytest.mark.apptainer
def test_a_queued_or_running_slurm_job_keeps_its_image_through_a_prune(cache: Path) -> None:
    """A held (queued) job pins its image; a running task holds the use lock; once both ended,
    the next prune removes the image and the pins."""
    from nsdf_hpc.client import Client
    from nsdf_hpc.schedulers import JobState, Slurm, SlurmSettings
    work = Path(tempfile.mkdtemp(prefix="nsdf-prune-slurm-", dir="/var/tmp"))
    ids: List[str] = []
    try:
        client = Client(env=root_env(cache))
        slurm = Slurm(settings=SlurmSettings(work_dir=str(work)))
        queued = client.submit(BUSYBOX, ["true"], runtime="apptainer", scheduler=slurm,
                               extra_directives=("--hold",))
        ids += queued.job_ids
        ic = ImageCache(str(cache))
        entry = next(e for e in ic.entries() if e.runtime == "apptainer")
        assert ic.pins(entry) == list(queued.job_ids)
        r = nsdf_root(["prune", "--max-size", "0"], cache)
        assert r.returncode == 0 and "removed 0 entries" in r.stdout, (r.stdout, r.stderr)
        assert f"Slurm job {queued.job_ids[0]} (queued or running) needs it" in r.stderr, r.stderr
        queued.cancel()
        assert queued.wait(timeout=60).state is JobState.CANCELED

        job = client.submit(BUSYBOX, ["sh", "-c", "sleep 8; echo done"], runtime="apptainer",
                            scheduler=slurm, time="2", bind_cwd=False)
        ids += job.job_ids
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and job.status().state is not JobState.ACTIVE:
            time.sleep(0.2)
        while time.monotonic() < deadline and not ic.in_use(entry):   # the task took the lock
            time.sleep(0.2)
        assert ic.in_use(entry), f"job {job.job_ids} never held its image's use lock: {job.status()}"
        client.cache.unpin(entry, ic.pins(entry))     # the lock alone must keep it now
        r = nsdf_root(["prune", "--max-size", "0"], cache)
        assert r.returncode == 0 and "removed 0 entries" in r.stdout, (r.stdout, r.stderr)
        assert "in use by a running container or Slurm task" in r.stderr, r.stderr
        st = job.wait(timeout=120)
        assert st.state is JobState.COMPLETED and st.exit_code == 0, st
        assert job.logs() == "done\n"
        client.cache.pin("apptainer", entry.digest, job.job_ids)    # a finished job pins nothing
        r = nsdf_root(["prune", "--max-size", "0"], cache)
        assert r.returncode == 0 and "removed 1 entry" in r.stdout, (r.stdout, r.stderr)
        assert not Path(ic.pin_dir("apptainer", entry.digest)).exists()
    finally:
        if ids:
            subprocess.run(["scancel", *ids], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
