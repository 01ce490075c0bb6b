"""Batch schedulers: Slurm through its commands (and pyslurm when it matches the cluster)."""
from __future__ import annotations

from .base import ArraySpec, Backoff, Dependency, JobSpec, JobState, JobStatus
from .slurm import SLURM_STATES, Job, Slurm, SlurmSettings

__all__ = ["ArraySpec", "Backoff", "Dependency", "JobSpec", "JobState", "JobStatus", "Job",
           "Slurm", "SlurmSettings", "SLURM_STATES", "get_backend"]


def get_backend(runner=None, settings=None, **overrides):  # type: ignore[no-untyped-def]
    """pyslurm when it imports and matches ``sinfo --version``, else the Slurm commands."""
    from .pyslurm_backend import select_backend
    return select_backend(runner, settings, **overrides)
