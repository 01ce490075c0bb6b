"""Batch schedulers, PSI/J-style rooms: which backend to use (and why), and the public names.

* :mod:`.states` (pure): JobState, JobStatus, Slurm's state table, array aggregation.
* :mod:`.commands` (pure): argv builders and output parsers of sbatch/sacct/scontrol/scancel/sinfo.
* :mod:`.spec` (pure models): JobSpec, ArraySpec, Dependency, job ids.
* :mod:`.script` (pure): #SBATCH directives, quoting, array splitting, the batch script.
* :mod:`.slurm`: the command backend, the only place here that runs commands.
* :mod:`.job`: the Job handle (status, wait, cancel, logs, follow).
* :mod:`.submit`: spec -> prepared job -> submitted, for a Client.
* :mod:`.pyslurm_backend`: pyslurm for status queries, only when it matches the cluster;
  and the choice among backends (:func:`get_backend`).
* :mod:`.rest_api` (pure) and :mod:`.rest`: slurmrestd over HTTP with a JWT, only when
  configured (``backend = "rest"``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from .._exec import CommandRunner
from ..config import SlurmSettings
from .backoff import Backoff
from .job import Job, wait_all
from .pyslurm_backend import select_backend   # it imports pyslurm itself only when asked
from .slurm import Slurm
from .spec import ArraySpec, Dependency, JobSpec, as_job_ids
from .states import SLURM_STATES, JobState, JobStatus

__all__ = ["ArraySpec", "Backoff", "Dependency", "JobSpec", "JobState", "JobStatus", "Job",
           "Slurm", "SlurmSettings", "SLURM_STATES", "as_job_ids", "get_backend", "wait_all"]


def get_backend(runner: Optional[CommandRunner] = None, settings: Optional[SlurmSettings] = None,
                env: Optional[Mapping[str, str]] = None, **overrides: Any) -> Slurm:
    """The configured backend (``backend`` in ``[slurm]``, ``NSDF_HPC_SLURM_BACKEND``); with
    ``auto``, pyslurm when it imports and matches ``sinfo --version``, else the Slurm
    commands; slurmrestd only when configured. The backend's ``choice_reason`` says why."""
    return select_backend(runner, settings, env=env, **overrides)
