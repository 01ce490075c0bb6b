"""Slurm's job states and ``sacct`` lines as plain data, without pydantic or click.

The pure core of :mod:`nsdf_hpc.schedulers.states` and :mod:`.schedulers.commands` (which
build :class:`~nsdf_hpc.schedulers.states.JobStatus` models from the fields made here), kept
out of the ``schedulers`` package so that the read-only fast path of ``nsdf-run status``
(``_status.py``) parses and prints exactly as the click command does without importing the
settings and status models (about 0.25 s of imports for one ``sacct`` call).

Like psij's ``JobState`` plus ``SlurmJobExecutor._STATE_MAP``: the enum carries a ``final``
flag and the table maps every Slurm word to it; unknown words map to UNKNOWN, never to a guess.
"""
from __future__ import annotations

import enum
import re
# not `from typing import ...` at run time: this module is on a start-up path
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Sequence, Tuple


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



def state_fields(raw: str, exit_code: str = "") -> Dict[str, Any]:
    """A status's fields from one state word (``"CANCELLED by 0"`` -> CANCELLED) and
    ``rc:sig``; the reason says what NODE_FAIL and OUT_OF_MEMORY mean (a reason Slurm gives
    replaces it)."""
    word = raw.split()[0].rstrip("+") if raw.strip() else ""
    word = _SHORT_STATES.get(word, word)
    state = SLURM_STATES.get(word, JobState.UNKNOWN)
    rc, sig = parse_exit_code(exit_code)
    if word == "OUT_OF_MEMORY" and sig == _SIG_OOM:
        sig = None
    return {"job_id": "", "state": state, "native_state": raw.strip(), "exit_code": rc,
            "signal": sig, "reason": FAILURE_REASONS.get(word)}


# ------------------------------------------------------------------ sacct

ACCOUNTING_DISABLED = "Slurm accounting storage is disabled"
SACCT_FIELDS = ("JobID", "State", "ExitCode", "Reason", "NodeList", "JobName")


def status_argv(job_ids: Sequence[str]) -> List[str]:
    """One sacct call for every job (JobName last: it may contain the delimiter)."""
    return ["sacct", "--parsable2", "--noheader", "-X", "-o", ",".join(SACCT_FIELDS),
            "-j", ",".join(job_ids)]


def sacct_fields(stdout: str) -> Dict[str, Dict[str, Any]]:
    """The status fields of each line of ``sacct --parsable2 --noheader -X -o
    JobID,State,ExitCode,Reason,NodeList,JobName``, keyed by JobID."""
    out: Dict[str, Dict[str, Any]] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", len(SACCT_FIELDS) - 1)
        if len(parts) < 3 or not re.match(r"^\d+", parts[0]):
            from .errors import UnexpectedOutputError   # noqa: PLC0415 (typing, shlex: only here)
            raise UnexpectedOutputError("sacct", stdout, expected="JobID|State|ExitCode|... lines")
        job_id = parts[0]
        st = state_fields(parts[1], parts[2])
        st.update(job_id=job_id, reason=final_reason(st["state"], parts[3] if len(parts) > 3 else None)
                  or st["reason"], name=parts[5] if len(parts) > 5 else None, source="sacct")
        out[job_id] = st
    return out


def is_partial(source: str, native_state: str, exit_code: Optional[int], signal: Optional[int]) -> bool:
    """A sacct line slurmdbd has not completed yet: FAILED with neither an exit code nor a
    signal (a failed job has one; seen just after slurmdbd came back: the state arrives
    before the exit code and the end time)."""
    return source == "sacct" and native_state == "FAILED" and not exit_code and not signal


# ------------------------------------------------------------------ the status table

def status_row(job_id: str, state: JobState, native_state: str, exit_code: Optional[int],
               signal: Optional[int], reason: Optional[str], accounting: bool) -> str:
    """One row of ``nsdf-run status`` (tab-separated; without the newline)."""
    code = "" if exit_code is None else f" exit={exit_code}"
    why = f" ({reason})" if reason else ""
    sig = f" signal={signal}" if signal else ""
    acct = "" if accounting else " [accounting disabled]"
    return f"{job_id}\t{state.value}\t{native_state or '-'}{code}{sig}{why}{acct}"
