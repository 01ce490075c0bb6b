"""One-line shortcuts over a default :class:`~nsdf_hpc.client.Client`."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from .client import Client
from .models import BuildResult, NativeImage, RunResult, RuntimeInfo
from .schedulers import Job, JobStatus
from .schedulers.submit import Prepared


def detect(refresh: bool = False) -> List[RuntimeInfo]:
    """Every known runtime with version, capabilities and why it is (un)usable."""
    return Client().detect(refresh=refresh)


def pull(image: str, runtime: Optional[str] = None, *, platform: Optional[str] = None) -> NativeImage:
    """Prepare ``image`` for ``runtime`` (default: the chosen one); cached by digest.
    ``platform`` ("linux/arm64") prepares another architecture's image, for its nodes."""
    return Client().pull(image, runtime, platform=platform)


def build(path: str, *, builder: Optional[str] = None, runtime: Optional[str] = None,
          tag: Optional[str] = None, dry_run: bool = False) -> BuildResult:
    """Build the recipe at ``path`` into ``nsdf/NAME:vX.Y.Z`` in the runtime's cache; see
    :meth:`Client.build`."""
    return Client().build(path, builder=builder, runtime=runtime, tag=tag, dry_run=dry_run)


def run(image: str, command: Sequence[str], runtime: Optional[str] = None, **options: Any) -> RunResult:
    """Run ``command`` in ``image``; see :meth:`Client.run` for the options."""
    return Client().run(image, command, runtime=runtime, **options)


def submit(image: str, command: Sequence[str], runtime: Optional[str] = None,
           **resources: Any) -> Union[Job, Prepared]:
    """Submit ``command`` in ``image`` to Slurm; returns a :class:`~nsdf_hpc.schedulers.Job`.

    ``resources`` are sbatch's (``nodes``, ``ntasks``, ``time``, ``partition``, ``array``,
    ``dependencies``, ``mpi``, ...) and the run options of :func:`run` (``env``, ``binds``, ...).
    """
    return Client().submit(image, command, runtime=runtime, **resources)


def submit_array(image: str, commands: Optional[Sequence[Sequence[str]]] = None, *,
                 template: Optional[Sequence[str]] = None, indices: Any = None,
                 runtime: Optional[str] = None, **resources: Any) -> Union[Job, Prepared]:
    """An array job: one command per task, or ``template`` with ``{index}`` per task."""
    return Client().submit_array(image, commands, template=template, indices=indices,
                                 runtime=runtime, **resources)


def attach(job_id: Union[str, int]) -> Job:
    """A :class:`~nsdf_hpc.schedulers.Job` for an existing Slurm job id."""
    return Client().scheduler().attach(job_id)


def wait_all(jobs: Sequence[Job], timeout: Optional[float] = None) -> List[JobStatus]:
    """Wait for many jobs with ONE status query per poll round."""
    if not jobs:
        return []
    return jobs[0].scheduler.wait_all(list(jobs), timeout=timeout)
