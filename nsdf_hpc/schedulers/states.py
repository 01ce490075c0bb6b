"""Job states (pure): the normalized state, one job's status, Slurm's state table, and the
aggregation of an array's task statuses into one.

Like psij's ``JobState`` plus ``SlurmJobExecutor._STATE_MAP``: the enum carries a ``final``
flag and the table maps every Slurm word to it; unknown words map to UNKNOWN, never to a guess.
"""
from __future__ import annotations

import enum
import re
from typing import Dict, Optional, Sequence, Tuple

from ..models import Model

__all__ = ["JobState", "JobStatus", "SLURM_STATES", "PENDING_REASONS", "aggregate",
           "FAILURE_REASONS", "slurm_state", "parse_exit_code", "final_reason"]


class JobState(str, enum.Enum):
    """The normalized state of a job (or of an array, aggregated)."""

    QUEUED = "QUEUED"
    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    UNKNOWN = "UNKNOWN"

    @property
    def final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELED)

    @property
    def ok(self) -> bool:
        return self is JobState.COMPLETED


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


#: Slurm state word -> normalized state. TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, PREEMPTED,
#: BOOT_FAIL and DEADLINE are failures whatever the exit code; unknown words map to UNKNOWN.
SLURM_STATES: Dict[str, JobState] = {
    "PENDING": JobState.QUEUED, "CONFIGURING": JobState.QUEUED, "REQUEUED": JobState.QUEUED,
    "REQUEUE_HOLD": JobState.QUEUED, "REQUEUE_FED": JobState.QUEUED, "RESV_DEL_HOLD": JobState.QUEUED,
    "RUNNING": JobState.ACTIVE, "COMPLETING": JobState.ACTIVE, "SUSPENDED": JobState.ACTIVE,
    "STAGE_OUT": JobState.ACTIVE, "SIGNALING": JobState.ACTIVE, "RESIZING": JobState.ACTIVE,
    "STOPPED": JobState.ACTIVE,
    "COMPLETED": JobState.COMPLETED,
    "CANCELLED": JobState.CANCELED, "REVOKED": JobState.CANCELED,
    "FAILED": JobState.FAILED, "TIMEOUT": JobState.FAILED, "OUT_OF_MEMORY": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED, "PREEMPTED": JobState.FAILED, "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED, "SPECIAL_EXIT": JobState.FAILED,
}
_SHORT_STATES = {"PD": "PENDING", "R": "RUNNING", "CG": "COMPLETING", "CD": "COMPLETED",
                 "CA": "CANCELLED", "F": "FAILED", "TO": "TIMEOUT", "OOM": "OUT_OF_MEMORY",
                 "NF": "NODE_FAIL", "PR": "PREEMPTED", "BF": "BOOT_FAIL", "DL": "DEADLINE",
                 "S": "SUSPENDED", "CF": "CONFIGURING", "RQ": "REQUEUED", "ST": "STOPPED"}

#: What a failure state means, for the states whose sacct Reason is "None" (seen on the
#: testbed, Slurm 22.05: a killed slurmd gives NODE_FAIL, a cgroup OOM kill OUT_OF_MEMORY).
FAILURE_REASONS: Dict[str, str] = {
    "NODE_FAIL": "a node of the job failed (its slurmd stopped answering); the job was killed",
    "OUT_OF_MEMORY": "the job used more memory than it was allocated (--mem) and was killed",
}
#: Slurm's OOM marker: 22.05 records an OOM-killed step as ``0:125`` (SIG_OOM 253 & 0x7f),
#: which is no signal at all
_SIG_OOM = 125

#: Why a job waits (Slurm's pending reasons). sacct keeps the last one on array tasks after
#: they ended ("COMPLETED (JobArrayTaskLimit)" would mislead), so a final status drops them.
PENDING_REASONS: Tuple[str, ...] = (
    "Priority", "Resources", "Dependency", "DependencyNeverSatisfied", "BeginTime", "JobArrayTaskLimit",
    "JobHeldUser", "JobHeldAdmin", "ReqNodeNotAvail", "PartitionTimeLimit", "PartitionDown",
    "PartitionInactive", "PartitionNodeLimit", "PartitionConfig", "Reservation", "Licenses",
    "BadConstraints", "InvalidQOS", "InvalidAccount", "Cleaning",
    "FrontEndDown", "Prolog", "launch_failed_requeued_held", "ResvDeleted",
)
_PENDING_PREFIXES = re.compile(r"^(QOS|Assoc|Max|JobHeld|ReqNodeNotAvail|Partition|Resv)")


def final_reason(state: JobState, reason: Optional[str]) -> Optional[str]:
    """``reason`` unless it is a pending reason left on a job that has ended."""
    if reason in (None, "", "None"):
        return None
    if state.final and (reason in PENDING_REASONS or _PENDING_PREFIXES.match(reason or "")):
        return None
    return reason


def parse_exit_code(text: str) -> Tuple[Optional[int], Optional[int]]:
    """``"3:0"`` -> ``(3, None)``; ``"0:15"`` -> ``(0, 15)``; ``""`` -> ``(None, None)``."""
    text = text.strip()
    if not text:
        return None, None
    rc, _, sig = text.partition(":")
    try:
        code = int(rc)
        signal = int(sig) if sig else 0
    except ValueError:
        return None, None
    return code, (signal or None)


def slurm_state(raw: str, exit_code: str = "") -> JobStatus:
    """A status from one state word (``"CANCELLED by 0"`` -> CANCELLED) and ``rc:sig``; the
    reason says what NODE_FAIL and OUT_OF_MEMORY mean (a reason Slurm gives replaces it)."""
    word = raw.split()[0].rstrip("+") if raw.strip() else ""
    word = _SHORT_STATES.get(word, word)
    state = SLURM_STATES.get(word, JobState.UNKNOWN)
    rc, sig = parse_exit_code(exit_code)
    if word == "OUT_OF_MEMORY" and sig == _SIG_OOM:
        sig = None
    return JobStatus(job_id="", state=state, native_state=raw.strip(), exit_code=rc, signal=sig,
                     reason=FAILURE_REASONS.get(word))


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
