"""One-line shortcuts over a default :class:`~nsdf_hpc.client.Client`.

The client is imported on first use: :func:`run` in a new process is answered from a launch
record when one holds (``_launch.try_api_run``), without pydantic, the models or planning.
"""
from __future__ import annotations

from . import _launch

# not `from typing import TYPE_CHECKING`: typing costs more than the rest of run()'s fast path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, List, Optional, Sequence, Union

    from ._result import RunResult
    from .client import Client
    from .models import BuildResult, NativeImage, RuntimeInfo
    from .schedulers import Job, JobStatus
    from .schedulers.submit import Prepared


def _client() -> Client:
    from .client import Client   # noqa: PLC0415 (see the module docstring)
    return Client()


def detect(refresh: bool = False) -> List[RuntimeInfo]:
    """Every known runtime with version, capabilities and why it is (un)usable."""
    return _client().detect(refresh=refresh)


def pull(image: str, runtime: Optional[str] = None, *, platform: Optional[str] = None) -> NativeImage:
    """Prepare ``image`` for ``runtime`` (default: the chosen one); cached by digest.
    ``platform`` ("linux/arm64") prepares another architecture's image, for its nodes."""
    return _client().pull(image, runtime, platform=platform)


def build(path: str, *, builder: Optional[str] = None, runtime: Optional[str] = None,
          tag: Optional[str] = None, dry_run: bool = False) -> BuildResult:
    """Build the recipe at ``path`` into ``nsdf/NAME:vX.Y.Z`` in the runtime's cache; see
    :meth:`Client.build`."""
    return _client().build(path, builder=builder, runtime=runtime, tag=tag, dry_run=dry_run)


def run(image: str, command: Sequence[str], runtime: Optional[str] = None, **options: Any) -> RunResult:
    """Run ``command`` in ``image``; see :meth:`Client.run` for the options.

    With no options but ``cwd``, ``env`` and ``binds`` (as strings), a call is planned once:
    the plan is kept as ``nsdf-run run`` keeps its launch record (re-checked on every use), and
    a later call with the same image, runtime, directories, variable names, bind options,
    settings and environment runs from it, in this process or a new one, without importing
    pydantic or planning again; any command, and other values and bind directories as the
    CLI's record serves them."""
    if set(options) <= {"cwd", "env", "binds"}:
        cwd, env, binds = options.get("cwd"), options.get("env"), options.get("binds")
        args = _launch.api_args(image, command, runtime, cwd, env, binds)
        if args is not None:
            done = _launch.try_api_run(args, cwd)
            if done is not None:
                return done
            return _client().run(image, command, runtime=runtime, record=args, **options)
    return _client().run(image, command, runtime=runtime, **options)


def submit(image: str, command: Sequence[str], runtime: Optional[str] = None,
           **resources: Any) -> Union[Job, Prepared]:
    """Submit ``command`` in ``image`` to Slurm; returns a :class:`~nsdf_hpc.schedulers.Job`.

    ``resources`` are sbatch's (``nodes``, ``ntasks``, ``time``, ``partition``, ``array``,
    ``dependencies``, ``mpi``, ...) and the run options of :func:`run` (``env``, ``binds``, ...).
    """
    return _client().submit(image, command, runtime=runtime, **resources)


def submit_array(image: str, commands: Optional[Sequence[Sequence[str]]] = None, *,
                 template: Optional[Sequence[str]] = None, indices: Any = None,
                 runtime: Optional[str] = None, **resources: Any) -> Union[Job, Prepared]:
    """An array job: one command per task, or ``template`` with ``{index}`` per task."""
    return _client().submit_array(image, commands, template=template, indices=indices,
                                 runtime=runtime, **resources)


def attach(job_id: Union[str, int]) -> Job:
    """A :class:`~nsdf_hpc.schedulers.Job` for an existing Slurm job id."""
    return _client().scheduler().attach(job_id)


def wait_all(jobs: Sequence[Job], timeout: Optional[float] = None) -> List[JobStatus]:
    """Wait for many jobs with ONE status query per poll round."""
    if not jobs:
        return []
    return jobs[0].scheduler.wait_all(list(jobs), timeout=timeout)
