"""Job states (pure): the normalized state, one job's status, Slurm's state table, and the
aggregation of an array's task statuses into one.

The state enum, Slurm's state table and the reasons live in :mod:`nsdf_hpc._slurm_text`
(plain data, no pydantic: the fast path of ``nsdf-run status`` uses them too); this module
adds the :class:`JobStatus` model made from them.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from .._slurm_text import (FAILURE_REASONS, PENDING_REASONS, SLURM_STATES, JobState, final_reason,
                           parse_exit_code, state_fields)
from ..models import Model

__all__ = ["JobState", "JobStatus", "SLURM_STATES", "PENDING_REASONS", "aggregate",
           "FAILURE_REASONS", "slurm_state", "parse_exit_code", "final_reason"]


class JobStatus(Model):
    """One job's (or array task's) state as the scheduler reported it."""

    job_id: str
    state: JobState
    native_state: str = ""               # Slurm's own word: "TIMEOUT", "CANCELLED by 0", ...
    reason: Optional[str] = None         # Slurm's reason (pending jobs) or our note
    exit_code: Optional[int] = None      # the job script's exit status
    signal: Optional[int] = None         # the signal that ended it, when one did
    name: Optional[str] = None
    source: str = ""                     # sacct | scontrol | exit-code-file | pyslurm | slurmrestd |
    #                                      slurmrestd-slurmdb | none
    accounting: bool = True              # False: accounting disabled, answer from squeue/scontrol/file
    tasks: int = 1                       # >1 for an aggregated array status

    @property
    def final(self) -> bool:
        return self.state.final

    def shell_exit_code(self) -> int:
        """The exit status a CLI should end with: 0 only for COMPLETED with status 0."""
        if self.state is JobState.COMPLETED:
            return self.exit_code or 0
        if self.exit_code:
            return self.exit_code
        if self.signal:
            return 128 + self.signal
        return 1


def slurm_state(raw: str, exit_code: str = "") -> JobStatus:
    """A status from one state word (``"CANCELLED by 0"`` -> CANCELLED) and ``rc:sig``; the
    reason says what NODE_FAIL and OUT_OF_MEMORY mean (a reason Slurm gives replaces it)."""
    return JobStatus(**state_fields(raw, exit_code))


def aggregate(job_id: str, statuses: Sequence[JobStatus]) -> JobStatus:
    """One status for an array from its tasks' (pending ranges included)."""
    if not statuses:
        return JobStatus(job_id=job_id, state=JobState.UNKNOWN, reason="no status reported")
    states = [s.state for s in statuses]
    first = statuses[0]
    if all(s.final for s in states):
        if all(s is JobState.COMPLETED for s in states):
            state = JobState.COMPLETED
        elif any(s is JobState.FAILED for s in states):
            state = JobState.FAILED
        else:
            state = JobState.CANCELED
    elif JobState.ACTIVE in states:
        state = JobState.ACTIVE
    elif JobState.QUEUED in states:
        state = JobState.QUEUED
    else:
        state = JobState.UNKNOWN if JobState.UNKNOWN in states else JobState.ACTIVE
    bad = [s for s in statuses if s.state not in (JobState.COMPLETED,)] or list(statuses)
    worst = max(bad, key=lambda s: (s.exit_code or 0, s.signal or 0))
    counts: Dict[str, int] = {}
    for s in statuses:
        word = s.native_state.split(" ")[0] or "?"
        counts[word] = counts.get(word, 0) + 1
    native = ",".join(f"{k}:{v}" for k, v in sorted(counts.items()))
    return JobStatus(job_id=job_id, state=state, native_state=native,
                     reason=final_reason(state, worst.reason), exit_code=worst.exit_code,
                     signal=worst.signal, name=first.name, source=first.source,
                     accounting=first.accounting, tasks=len(statuses))
