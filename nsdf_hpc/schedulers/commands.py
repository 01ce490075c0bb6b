"""Slurm's commands as data (pure): argv builders and output parsers, psij-style pairs.

Nothing here runs a process: :mod:`.slurm` runs these argv lists through the injected
:class:`~nsdf_hpc._exec.CommandRunner`, and the parsers are tested from recorded output.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import UnexpectedOutputError
from .._slurm_text import ACCOUNTING_DISABLED, SACCT_FIELDS, is_partial, sacct_fields, status_argv
from .states import JobStatus, final_reason, parse_exit_code, slurm_state

__all__ = ["TRANSIENT_PATTERNS", "ACCOUNTING_DISABLED", "SACCT_FIELDS", "is_transient",
           "sbatch_argv", "status_argv", "scontrol_jobs_argv", "scontrol_job_argv",
           "cancel_argv", "show_config_argv", "version_argv", "parse_submit", "parse_sacct",
           "parse_scontrol_jobs", "parse_job_paths", "is_partial_record", "parse_exit_code",
           "parse_max_array_size", "parse_slurm_version"]

#: Messages after which a retry may succeed (submit, status and cancel).
TRANSIENT_PATTERNS: Tuple[str, ...] = (
    "Socket timed out", "Unable to contact slurm controller", "QOSMaxSubmitJobPerUserLimit",
    "Slurm temporarily unable to accept job", "Resource temporarily unavailable",
    "Connection refused", "Connection timed out", "Problem talking to the database",
    "Transport endpoint is not connected", "Zero Bytes were transmitted or received",
    "Slurm backup controller in standby mode", "slurm_persist_conn_open",
)

def is_transient(text: str) -> bool:
    return any(p.lower() in text.lower() for p in TRANSIENT_PATTERNS)


# ---------------------------------------------------------------------------- argv builders
def sbatch_argv(script: str, args: Sequence[str] = (), options: Sequence[str] = ()) -> List[str]:
    """``options`` override the script's #SBATCH lines (an array chunk's --array)."""
    return ["sbatch", "--parsable", *options, script, *args]


def sbatch_stdin_argv() -> List[str]:
    """``sbatch`` started ahead of its script, which it then reads from stdin
    (:meth:`nsdf_hpc.schedulers.slurm.Slurm.start_ahead`)."""
    return ["sbatch", "--parsable"]


def cancel_argv(job_ids: Sequence[str]) -> List[str]:
    """One scancel for every id; ``JOBID_TASK`` cancels one array task."""
    return ["scancel", *job_ids]


def scontrol_job_argv(job_id: str) -> List[str]:
    return ["scontrol", "show", "job", "-o", job_id]


def show_config_argv() -> List[str]:
    return ["scontrol", "show", "config"]


def version_argv() -> List[str]:
    return ["sinfo", "--version"]


def parse_submit(stdout: str) -> str:
    """``sbatch --parsable`` prints ``jobid`` or ``jobid;cluster``."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    job_id = first.split(";", 1)[0].strip()
    if not job_id.isdigit():
        raise UnexpectedOutputError("sbatch", stdout,
                                    expected="'<jobid>' or '<jobid>;<cluster>' (sbatch --parsable)")
    return job_id


def parse_sacct(stdout: str) -> Dict[str, JobStatus]:
    """``sacct --parsable2 --noheader -X -o JobID,State,ExitCode,Reason,NodeList,JobName``
    (the fields from :func:`nsdf_hpc._slurm_text.sacct_fields`)."""
    return {k: JobStatus(**v) for k, v in sacct_fields(stdout).items()}


def is_partial_record(st: JobStatus) -> bool:
    """See :func:`nsdf_hpc._slurm_text.is_partial`."""
    return is_partial(st.source, st.native_state, st.exit_code, st.signal)


def scontrol_jobs_argv() -> List[str]:
    return ["scontrol", "show", "job", "-o"]


def parse_scontrol_jobs(stdout: str) -> Dict[str, JobStatus]:
    """``scontrol show job -o``: one line per job; JobName may contain spaces and '='."""
    out: Dict[str, JobStatus] = {}
    for line in stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("No jobs in the system"):
            continue
        m = re.match(r"^JobId=(\d+)(?: ArrayJobId=(\d+) ArrayTaskId=(\S+))?(?: \S+=\S*)*? "
                     r"JobName=(.*?) UserId=\S*\(\d+\) GroupId=", line)
        if not m:
            raise UnexpectedOutputError("scontrol show job -o", stdout,
                                        expected="'JobId=N [ArrayJobId=..] JobName=... UserId=...' lines")
        job_id, arr_job, arr_task, name = m.group(1), m.group(2), m.group(3), m.group(4)
        rest = line[m.end():]

        def field_(key: str) -> Optional[str]:
            f = re.search(r"(?:^| )" + key + r"=(\S*)", rest)
            return f.group(1) if f else None
        if arr_job and arr_task is not None:
            key = f"{arr_job}_{arr_task}" if arr_task.isdigit() else f"{arr_job}_[{arr_task}]"
        else:
            key = job_id
        st = slurm_state(field_("JobState") or "", field_("ExitCode") or "")
        reason = field_("Reason")
        out[key] = st.model_copy(update={
            "job_id": key, "name": name, "source": "scontrol", "accounting": False,
            "reason": final_reason(st.state, reason) or st.reason})
    return out


def parse_max_array_size(stdout: str) -> int:
    m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", stdout, re.M)
    if not m:
        raise UnexpectedOutputError("scontrol show config", stdout, expected="'MaxArraySize = N'")
    return int(m.group(1))


def parse_slurm_version(stdout: str) -> Tuple[int, int]:
    """``slurm 22.05.8`` / ``slurm-wlm 22.05.8`` -> ``(22, 5)``."""
    m = re.search(r"(\d+)\.(\d+)", stdout)
    if not m:
        raise UnexpectedOutputError("sinfo --version", stdout, expected="'slurm X.Y.Z'")
    return int(m.group(1)), int(m.group(2))


def parse_job_paths(stdout: str) -> Dict[str, object]:
    """stdout/stderr paths (as sbatch patterns: ``%`` doubled) of one ``scontrol show job -o``
    answer, and whether the job is an array task."""
    out: Dict[str, object] = {}
    for key, field_, end in (("error", "StdErr", " StdIn="), ("output", "StdOut", " Power=")):
        m = re.search(" " + field_ + "=(.*?)" + end, stdout) or \
            re.search(" " + field_ + r"=(\S+)", stdout)
        if m and m.group(1):
            out[key] = m.group(1).replace("%", "%%")
    if re.search(r" ArrayTaskId=(\S+)", stdout):
        out["array"] = True
    return out
