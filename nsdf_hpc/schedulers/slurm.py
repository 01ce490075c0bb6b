"""Slurm through its commands: pure argv builders and output parsers, effects written once.

* ``sbatch --parsable SCRIPT [OFFSET]`` submits a script file (never ``--wrap``); transient
  errors ("Socket timed out", "Unable to contact slurm controller", QOSMaxSubmitJobPerUserLimit)
  are retried with backoff.
* Status of any number of jobs is ONE ``sacct --parsable2 --noheader -X -j ID,ID,...`` call
  (plus one ``scontrol show job -o`` only while some job is not in the database yet: just
  submitted, or held, since slurmctld records jobs when they become eligible).
  Where accounting is disabled (``accounting="none"``, or sacct says "Slurm accounting storage
  is disabled"), ONE ``scontrol show job -o`` call and the job's exit-code file stand in, and
  every status says so (``accounting=False``, ``source``).
* Arrays are split by ``MaxArraySize`` (from ``scontrol show config``): it caps the *index*,
  so N tasks cost ceil(N / MaxArraySize) ``sbatch`` calls, each chunk indexed from 0 and
  mapped back to the user's indices inside the job.

The batch script calls the container runtime directly with the exact argv and process
environment the runtime layer builds (``Client.invocation``), under ``env -i``; Slurm/MPI
variables set per rank (``SLURM_*``, ``PMI*``, ...) are forwarded into the container the way
that runtime takes variables (found by building the invocation with a probe variable).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import logging
import os
import random
import re
import shlex
import time
import uuid
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple,
                    Union)

from .._version import __version__
from .._exec import CommandRunner, SubprocessRunner
from ..environment import dq_escape, matches
from ..errors import (CommandError, CommandTimeoutError, SchedulerError, SpecError, SubmitError,
                      ToolNotFoundError, UnexpectedOutputError)
from .base import (ArraySpec, Backoff, JobSpec, JobState, JobStatus, TASK_INDEX, aggregate,
                   compress_indices)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- state table
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

#: Messages after which a retry may succeed (submit, status and cancel).
TRANSIENT_PATTERNS: Tuple[str, ...] = (
    "Socket timed out", "Unable to contact slurm controller", "QOSMaxSubmitJobPerUserLimit",
    "Slurm temporarily unable to accept job", "Resource temporarily unavailable",
    "Connection refused", "Connection timed out", "Problem talking to the database",
    "Transport endpoint is not connected", "Zero Bytes were transmitted or received",
    "Slurm backup controller in standby mode", "slurm_persist_conn_open",
)
ACCOUNTING_DISABLED = "Slurm accounting storage is disabled"

#: Variables Slurm and MPI set per job step or rank: never taken from the submit host,
#: forwarded into the container from each rank's own environment instead.
JOB_TIME_PATTERNS: Tuple[str, ...] = (
    "SLURM_*", "SLURMD_*", "SRUN_*", "PMI*", "PMIX_*", "OMPI_*", "*_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
)
_PROBE_NAME = "NSDFPROBEVARNAME"
_PROBE_VALUE = "NSDFPROBEVARVALUE"
_CMD_SENTINEL = "NSDFCMDSENTINEL"


def slurm_state(raw: str, exit_code: str = "") -> JobStatus:
    """A status from one state word (``"CANCELLED by 0"`` -> CANCELLED) and ``rc:sig``."""
    word = raw.split()[0].rstrip("+") if raw.strip() else ""
    word = _SHORT_STATES.get(word, word)
    state = SLURM_STATES.get(word, JobState.UNKNOWN)
    rc, sig = parse_exit_code(exit_code)
    return JobStatus(job_id="", state=state, native_state=raw.strip(), exit_code=rc, signal=sig)


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


def is_transient(text: str) -> bool:
    return any(p.lower() in text.lower() for p in TRANSIENT_PATTERNS)


# ---------------------------------------------------------------------------- parsers
def parse_submit(stdout: str) -> str:
    """``sbatch --parsable`` prints ``jobid`` or ``jobid;cluster``."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    job_id = first.split(";", 1)[0].strip()
    if not job_id.isdigit():
        raise UnexpectedOutputError("sbatch", stdout,
                                    expected="'<jobid>' or '<jobid>;<cluster>' (sbatch --parsable)")
    return job_id


SACCT_FIELDS = ("JobID", "State", "ExitCode", "Reason", "NodeList", "JobName")


def status_argv(job_ids: Sequence[str]) -> List[str]:
    """One sacct call for every job (JobName last: it may contain the delimiter)."""
    return ["sacct", "--parsable2", "--noheader", "-X", "-o", ",".join(SACCT_FIELDS),
            "-j", ",".join(job_ids)]


def parse_sacct(stdout: str) -> Dict[str, JobStatus]:
    """``sacct --parsable2 --noheader -X -o JobID,State,ExitCode,Reason,NodeList,JobName``."""
    out: Dict[str, JobStatus] = {}
    for line in stdout.splitlines():
        if not line.strip():
            continue
        parts = line.split("|", len(SACCT_FIELDS) - 1)
        if len(parts) < 3 or not re.match(r"^\d+", parts[0]):
            raise UnexpectedOutputError("sacct", stdout, expected="JobID|State|ExitCode|... lines")
        job_id = parts[0]
        st = slurm_state(parts[1], parts[2])
        reason = parts[3] if len(parts) > 3 and parts[3] not in ("", "None") else None
        name = parts[5] if len(parts) > 5 else None
        out[job_id] = st.model_copy(update={"job_id": job_id, "reason": reason, "name": name,
                                            "source": "sacct"})
    return out


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
            "reason": None if reason in (None, "None") else reason})
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


# ---------------------------------------------------------------------------- arrays
@dataclass(frozen=True)
class ArrayChunk:
    """One sbatch call of an array: its ``--array`` value and the position offset (or None
    when Slurm's task ids are the user's indices)."""

    array: str
    offset: Optional[int]
    positions: Tuple[int, int]     # [start, stop) in the sorted index list


def split_array(array: ArraySpec, max_array_size: int) -> List[ArrayChunk]:
    """Split by MaxArraySize, a cap on the index (valid ids: 0..MaxArraySize-1)."""
    idx = array.indices
    thr = f"%{array.throttle}" if array.throttle else ""
    if idx[-1] < max_array_size:
        return [ArrayChunk(compress_indices(idx) + thr, None, (0, len(idx)))]
    chunks = []
    for start in range(0, len(idx), max_array_size):
        stop = min(len(idx), start + max_array_size)
        chunks.append(ArrayChunk(f"0-{stop - start - 1}{thr}", start, (start, stop)))
    return chunks


def _contiguous(idx: Sequence[int]) -> bool:
    return idx[-1] - idx[0] + 1 == len(idx)


# ---------------------------------------------------------------------------- quoting
def sbatch_quote(value: str) -> str:
    """Quote a value for an ``#SBATCH`` line as sbatch itself parses it: inside double
    quotes whitespace and ``#`` are literal, and a backslash escapes the next character
    (``\\"``, ``\\\\``). shlex.quote is not enough there: sbatch treats a backslash inside
    single quotes as an escape too, and an escaped space still ends the word."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise SpecError(f"an #SBATCH value cannot contain a newline or NUL: {value!r}")
    if value and not any(c.isspace() or c in "\\'\"#" for c in value):
        return value
    return '"' + "".join("\\" + c if c in '\\"' else c for c in value) + '"'


def _dq_template(template: str) -> str:
    """A probe template ("--env=NAME=VALUE") as a bash double-quoted word over ``$n``."""
    body = dq_escape(template)
    return '"' + body.replace(_PROBE_NAME, "${n}").replace(_PROBE_VALUE, "${!n}") + '"'


def _case_patterns(patterns: Iterable[str]) -> str:
    safe = [p for p in patterns if re.fullmatch(r"[A-Za-z0-9_*?]+", p)]
    return "|".join(safe)


# ---------------------------------------------------------------------------- script
@dataclass(frozen=True)
class ScriptInputs:
    """Everything the script needs besides the JobSpec (built on the submit host)."""

    prefix: Tuple[str, ...]                 # runtime argv without the command
    fixed_env: Mapping[str, str]            # the runtime process environment (env -i)
    job_dir: str
    script_path: str
    chdir: str
    fwd_env: Tuple[str, ...] = ()           # templates for forwarded variables (process env)
    fwd_args: Tuple[str, ...] = ()          # templates for forwarded variables (argv)
    fwd_index: int = 0                      # where fwd_args go in prefix
    forward: Tuple[str, ...] = JOB_TIME_PATTERNS
    deny: Tuple[str, ...] = ()
    array_indices: Tuple[int, ...] = ()
    remapped: bool = False                  # array chunks indexed from 0 (MaxArraySize split)
    header: Tuple[str, ...] = ()
    output: str = ""
    error: str = ""


def default_output(spec: JobSpec, job_dir: str, stream: str) -> str:
    pattern = "%A_%a" if spec.array else "%j"
    return os.path.join(job_dir, f"{pattern}.{stream}")


def _command_words(argv: Sequence[str]) -> str:
    words = []
    for a in argv:
        if TASK_INDEX in a:
            words.append('"${NSDF_TASK_INDEX}"'.join(shlex.quote(p) if p else "" for p in a.split(TASK_INDEX))
                         or '"${NSDF_TASK_INDEX}"')
        else:
            words.append(shlex.quote(a))
    return " ".join(words)


def directives(spec: JobSpec, inputs: ScriptInputs, array: Optional[str] = None) -> List[str]:
    q = sbatch_quote
    d: List[str] = [f"--job-name={q(spec.job_name)}", f"--output={q(inputs.output)}",
                    f"--error={q(inputs.error)}", f"--chdir={q(inputs.chdir)}", "--export=NIL"]
    for flag, value in (("nodes", spec.nodes), ("ntasks", spec.ntasks),
                        ("ntasks-per-node", spec.ntasks_per_node),
                        ("cpus-per-task", spec.cpus_per_task), ("mem", spec.mem),
                        ("gpus", spec.gpus), ("time", spec.time), ("partition", spec.partition),
                        ("account", spec.account), ("qos", spec.qos),
                        ("constraint", spec.constraint)):
        if value is not None:
            d.append(f"--{flag}={q(str(value))}")
    if spec.exclusive:
        d.append("--exclusive")
    if array:
        d.append(f"--array={q(array)}")
    if spec.dependencies:
        d.append("--dependency=" + q(",".join(f"{x.kind}:{':'.join(x.job_ids)}" for x in spec.dependencies)))
        d.append("--kill-on-invalid-dep=yes")
    for extra in spec.extra_directives:
        name, eq, value = extra.partition("=")
        d.append(f"{q(name)}={q(value)}" if eq else q(name))
    return ["#SBATCH " + x for x in d]


def uses_srun(spec: JobSpec) -> bool:
    return bool(spec.mpi) or (spec.nodes or 1) > 1 or (spec.ntasks or 1) > 1 \
        or (spec.ntasks_per_node or 1) > 1


def render_script(spec: JobSpec, inputs: ScriptInputs, array: Optional[str] = None) -> str:
    """The batch script (pure). ``array`` is the ``--array`` value of this chunk."""
    L: List[str] = ["#!/bin/bash", *directives(spec, inputs, array)]
    L += [f"# {h}" for h in inputs.header]
    path = inputs.fixed_env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    L += ["", f"export PATH={shlex.quote(path)}",
          f"NSDF_JOB_DIR={shlex.quote(inputs.job_dir)}",
          f"NSDF_SCRIPT={shlex.quote(inputs.script_path)}", ""]
    # the command of this task
    L.append("nsdf_task() {")
    if spec.commands is not None:
        L.append('  case "${NSDF_TASK_INDEX-}" in')
        for i, cmd in zip(inputs.array_indices, spec.commands):
            L.append(f"    {i}) NSDF_CMD=({_command_words(cmd)}) ;;")
        L.append('    *) echo "nsdf-hpc: no command for task ${NSDF_TASK_INDEX-}" >&2; return 127 ;;')
        L.append("  esac")
    else:
        L.append(f"  NSDF_CMD=({_command_words(spec.command)})")
    L.append("}")
    # one rank: the runtime under env -i, per-rank Slurm/MPI variables forwarded
    explicit = _case_patterns(sorted(spec.env)) if spec.env else ""
    fwd = _case_patterns(inputs.forward)
    deny = _case_patterns(inputs.deny)
    L.append("nsdf_rank() {")
    L.append("  local n fwd_env=() fwd_arg=()")
    if fwd and (inputs.fwd_env or inputs.fwd_args):
        L.append("  for n in $(compgen -e); do")
        L.append(f"    case \"$n\" in {fwd}) ;; *) continue ;; esac")
        if deny:
            L.append(f"    case \"$n\" in {deny}) continue ;; esac")
        if explicit:
            L.append(f"    case \"$n\" in {explicit}) continue ;; esac")
        for t in inputs.fwd_env:
            L.append(f"    fwd_env+=({_dq_template(t)})")
        for t in inputs.fwd_args:
            L.append(f"    fwd_arg+=({_dq_template(t)})")
        L.append("  done")
    L.append("  nsdf_task || exit $?")
    env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in inputs.fixed_env.items())
    head = " ".join(shlex.quote(a) for a in inputs.prefix[:inputs.fwd_index])
    tail = " ".join(shlex.quote(a) for a in inputs.prefix[inputs.fwd_index:])
    L.append(f"  exec /usr/bin/env -i {env_words} \"${{fwd_env[@]}}\" \\")
    L.append(f"    {head} \"${{fwd_arg[@]}}\" {tail} \"${{NSDF_CMD[@]}}\"")
    L.append("}")
    L.append('if [ "${1-}" = --nsdf-rank ]; then nsdf_rank; fi')
    L.append("")
    # which task this is, and where its exit code goes
    if spec.array:
        idx = inputs.array_indices
        if not inputs.remapped:
            L.append('NSDF_TASK_INDEX=$SLURM_ARRAY_TASK_ID')
        elif _contiguous(idx):
            L.append(f'NSDF_TASK_INDEX=$(( {idx[0]} + ${{1:-0}} + SLURM_ARRAY_TASK_ID ))')
        else:
            L.append(f"NSDF_INDICES=({' '.join(map(str, idx))})")
            L.append('NSDF_TASK_INDEX=${NSDF_INDICES[$(( ${1:-0} + SLURM_ARRAY_TASK_ID ))]}')
        L.append('NSDF_EXIT_FILE="$NSDF_JOB_DIR/exit/${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"')
    else:
        L.append("NSDF_TASK_INDEX=0")
        L.append('NSDF_EXIT_FILE="$NSDF_JOB_DIR/exit/$SLURM_JOB_ID"')
    L.append("export NSDF_TASK_INDEX")
    if uses_srun(spec):
        srun = ["srun", "--export=ALL", "--kill-on-bad-exit=1"]
        if spec.mpi:
            srun.append(f"--mpi={spec.mpi}")
        L.append(" ".join(shlex.quote(a) for a in srun) + ' /bin/bash "$NSDF_SCRIPT" --nsdf-rank')
    else:
        L.append("( nsdf_rank )")
    L += ["rc=$?",
          'mkdir -p "$NSDF_JOB_DIR/exit" && printf \'%s\\n\' "$rc" > "$NSDF_EXIT_FILE.tmp" '
          '&& mv -f "$NSDF_EXIT_FILE.tmp" "$NSDF_EXIT_FILE"',
          'exit "$rc"']
    return "\n".join(L) + "\n"


def probe_templates(base: Sequence[str], probe: Sequence[str], base_env: Mapping[str, str],
                    probe_env: Mapping[str, str]) -> Tuple[Tuple[str, ...], Tuple[str, ...], int]:
    """How this runtime takes one more container variable: the argv words and process-env
    entries that appear when a probe variable is added (pure)."""
    env_t = tuple(f"{k}={v}" for k, v in probe_env.items()
                  if k not in base_env and (_PROBE_NAME in k or _PROBE_VALUE in v))
    args: Tuple[str, ...] = ()
    index = len(base)
    ops = [op for op in difflib.SequenceMatcher(a=list(base), b=list(probe), autojunk=False).get_opcodes()
           if op[0] != "equal"]
    if len(ops) == 1 and ops[0][0] == "insert":
        _, i1, _, j1, j2 = ops[0]
        args, index = tuple(probe[j1:j2]), i1
    elif ops:
        logger.warning("cannot tell how the runtime takes variables (argv diff %s): Slurm/MPI "
                       "variables are passed through the process environment only", ops)
    return env_t, args, index


# ---------------------------------------------------------------------------- settings
@dataclass
class SlurmSettings:
    """``[slurm]`` in the config files, ``NSDF_HPC_SLURM_*`` variables, then arguments."""

    work_dir: str = ""
    accounting: str = "auto"            # auto | sacct | none
    poll_initial: float = 0.5
    poll_cap: float = 15.0
    partition: Optional[str] = None
    account: Optional[str] = None
    extra_directives: Tuple[str, ...] = ()
    submit_retries: int = 6
    command_timeout: float = 60.0

    @classmethod
    def load(cls, env: Optional[Mapping[str, str]] = None, files: Optional[Sequence[str]] = None,
             **overrides: Any) -> "SlurmSettings":
        from ..config import _read_toml, config_files
        env = os.environ if env is None else env
        values: Dict[str, Any] = {}
        for path in (config_files(env) if files is None else files):
            table = _read_toml(path).get("slurm", {})
            if not isinstance(table, dict):
                raise SpecError(f"{path}: [slurm] must be a table")
            values.update(table)
        if env.get("NSDF_HPC_SLURM_DIR"):
            values["work_dir"] = env["NSDF_HPC_SLURM_DIR"]
        if env.get("NSDF_HPC_SLURM_ACCOUNTING"):
            values["accounting"] = env["NSDF_HPC_SLURM_ACCOUNTING"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        unknown = set(values) - known
        if unknown:
            from ..errors import ConfigError
            raise ConfigError(f"unknown [slurm] setting(s) {', '.join(sorted(unknown))}")
        if "extra_directives" in values:
            values["extra_directives"] = tuple(values["extra_directives"])
        s = cls(**values)
        if not s.work_dir:
            home = env.get("HOME") or os.path.expanduser("~")
            s.work_dir = os.path.join(home, ".nsdf-hpc", "jobs")
        s.work_dir = os.path.abspath(os.path.expanduser(os.path.expandvars(s.work_dir)))
        if s.accounting not in ("auto", "sacct", "none"):
            from ..errors import ConfigError
            raise ConfigError(f"slurm accounting {s.accounting!r}: use auto, sacct or none")
        return s


# ---------------------------------------------------------------------------- the backend
class _TransientStatusError(SchedulerError):
    """A status query failed in a way a later poll may not (controller restarting, ...)."""

    transient = True


class Slurm:
    """The Slurm command-line backend (``sbatch``, ``sacct``, ``scontrol``, ``scancel``)."""

    name = "slurm"
    backend = "commands"

    def __init__(self, runner: Optional[CommandRunner] = None,
                 settings: Optional[SlurmSettings] = None, *,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None, **overrides: Any) -> None:
        self.runner: CommandRunner = runner or SubprocessRunner()
        self.settings = settings or SlurmSettings.load(**overrides)
        self.accounting = self.settings.accounting
        self._sleep, self._clock = sleep, clock
        self._rng = rng or random.Random()
        self._max_array: Optional[int] = None
        self.dirs: Dict[str, str] = {}          # job id -> job directory (exit-code files)
        self.calls = 0                          # scheduler commands run (status/submit/cancel)

    # -------------------------------------------------------------- running commands
    def _run(self, argv: Sequence[str], check: bool = False, timeout: Optional[float] = None):
        """Run one Slurm command; inherited ``SBATCH_*`` variables are removed (they would
        silently change what the script asks for)."""
        self.calls += 1
        env_overrides = {k: None for k in os.environ if k.startswith("SBATCH_")}
        try:
            return self.runner.run(argv, check=check, timeout=timeout or self.settings.command_timeout,
                                   env_overrides=env_overrides or None)
        except ToolNotFoundError as err:
            raise SchedulerError(f"Slurm is not available here: {err}") from err
        except CommandTimeoutError as err:
            if argv and argv[0] in ("sacct", "scontrol", "squeue"):
                raise _TransientStatusError(str(err)) from err
            raise

    def max_array_size(self) -> int:
        """``MaxArraySize`` from ``scontrol show config`` (read once; Slurm's default 1001
        when it cannot be read)."""
        if self._max_array is None:
            try:
                res = self._run(["scontrol", "show", "config"], check=True)
                self._max_array = parse_max_array_size(res.stdout)
            except (CommandError, UnexpectedOutputError) as err:
                logger.warning("cannot read MaxArraySize (%s); assuming Slurm's default 1001", err)
                self._max_array = 1001
        return self._max_array

    def version(self) -> Tuple[int, int]:
        res = self._run(["sinfo", "--version"], check=True)
        return parse_slurm_version(res.stdout)

    # -------------------------------------------------------------- submit
    def submit_argv(self, script: str, args: Sequence[str] = (),
                    options: Sequence[str] = ()) -> List[str]:
        """``options`` override the script's #SBATCH lines (an array chunk's --array)."""
        return ["sbatch", "--parsable", *options, script, *args]

    def sbatch(self, script: str, args: Sequence[str] = (), options: Sequence[str] = ()) -> str:
        """Submit one script file; transient errors are retried with backoff."""
        backoff = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.3, clock=self._clock,
                          sleep=self._sleep, rng=self._rng)
        attempts = max(1, self.settings.submit_retries)
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                res = self._run(self.submit_argv(script, args, options))
            except CommandTimeoutError as err:
                # the job may or may not exist: not retried blindly
                raise SubmitError(f"sbatch timed out; check `squeue` before submitting again: {err}",
                                  transient=True) from err
            if res.returncode == 0:
                return parse_submit(res.stdout)
            last = (res.stderr or res.stdout).strip()
            if not is_transient(last):
                raise SubmitError(f"sbatch refused the job: {last or f'exit status {res.returncode}'}")
            if attempt < attempts:
                logger.info("sbatch: %s (attempt %d/%d; retrying)", last, attempt, attempts)
                backoff.sleep()
        raise SubmitError(f"sbatch failed {attempts} times with a transient error: {last}",
                          transient=True)

    # -------------------------------------------------------------- status
    def status(self, job_ids: Sequence[str]) -> Dict[str, JobStatus]:
        """Statuses of every job in ONE scheduler call (array tasks keyed ``ID_TASK``)."""
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        if not ids:
            return {}
        if self.accounting != "none":
            res = self._run(status_argv(ids))
            text = res.stderr + res.stdout
            if ACCOUNTING_DISABLED.lower() in text.lower():
                if self.accounting == "sacct":
                    raise SchedulerError(f"sacct: {ACCOUNTING_DISABLED} (set accounting to auto or none)")
                logger.info("sacct: %s; using scontrol and exit-code files", ACCOUNTING_DISABLED)
                self.accounting = "none"
            elif res.returncode != 0:
                msg = f"`sacct` failed: {res.stderr.strip() or res.returncode}"
                if is_transient(res.stderr):
                    raise _TransientStatusError(msg)
                raise SchedulerError(msg)
            else:
                table = parse_sacct(res.stdout)
                present = {k.split("_", 1)[0] for k in table} | set(table)
                missing = [j for j in ids if j not in present]
                if missing:
                    # not in the database yet (submitted a moment ago, or held: slurmctld
                    # records a job when it becomes eligible): slurmctld answers for them
                    extra = self._scontrol_status(missing)
                    for k, v in extra.items():
                        table.setdefault(k, v.model_copy(update={"accounting": True}))
                return table
        return self._scontrol_status(ids)

    def _scontrol_status(self, ids: Sequence[str]) -> Dict[str, JobStatus]:
        res = self._run(scontrol_jobs_argv())
        if res.returncode != 0:
            msg = f"`scontrol show job` failed: {res.stderr.strip() or res.returncode}"
            if is_transient(res.stderr):
                raise _TransientStatusError(msg)
            raise SchedulerError(msg)
        wanted = set(ids)
        table = {k: v for k, v in parse_scontrol_jobs(res.stdout).items()
                 if k in wanted or k.split("_")[0] in wanted}
        present = {k.split("_", 1)[0] for k in table} | set(table)
        for j in ids:
            if j not in present:        # gone from slurmctld's memory (MinJobAge)
                table[j] = self._exit_file_status(j)
        return table

    def _exit_file_status(self, job_id: str) -> JobStatus:
        d = self.dirs.get(job_id.split("_")[0]) or self._find_dir(job_id.split("_")[0])
        path = os.path.join(d, "exit", job_id) if d else None
        if path and os.path.exists(path):
            try:
                rc = int(open(path).read().strip() or "-1")
            except (OSError, ValueError):
                rc = -1
            state = JobState.COMPLETED if rc == 0 else JobState.FAILED
            return JobStatus(job_id=job_id, state=state, exit_code=rc, source="exit-code-file",
                             accounting=False,
                             reason="job no longer known to slurmctld; state from its exit-code file")
        why = ("not known to slurmctld (accounting disabled)" if self.accounting == "none"
               else "known neither to sacct nor to slurmctld")
        return JobStatus(job_id=job_id, state=JobState.UNKNOWN, source="none",
                         accounting=self.accounting != "none", reason=f"{why}, and no exit-code file")

    def _find_dir(self, job_id: str) -> Optional[str]:
        link = os.path.join(self.settings.work_dir, "by-id", job_id)
        return os.path.realpath(link) if os.path.islink(link) else None

    # -------------------------------------------------------------- cancel
    def cancel_argv(self, job_ids: Sequence[str]) -> List[str]:
        return ["scancel", *job_ids]

    def cancel(self, job_ids: Sequence[str]) -> None:
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        if not ids:
            return
        res = self._run(self.cancel_argv(ids))
        if res.returncode != 0 and "already completing or completed" not in res.stderr \
                and "Invalid job id" not in res.stderr:
            raise SchedulerError(f"scancel failed: {res.stderr.strip() or res.returncode}")

    # -------------------------------------------------------------- handles
    def attach(self, job_id: Union[str, int]) -> "Job":
        """A handle on an existing job (submitted by anyone, by nsdf-hpc or not)."""
        jid = str(job_id)
        if not re.fullmatch(r"\d+", jid):
            raise SpecError(f"invalid job id {jid!r}")
        d = self.dirs.get(jid) or self._find_dir(jid)
        prov = _read_json(os.path.join(d, "provenance.json")) if d else {}
        ids = tuple(prov.get("job_ids") or (jid,)) if jid in (prov.get("job_ids") or ()) else (jid,)
        for i in ids:
            if d:
                self.dirs[i] = d
        if not prov:
            prov = self._paths_from_scontrol(jid)
        return Job(self, ids, directory=d, provenance=prov)

    def _paths_from_scontrol(self, job_id: str) -> Dict[str, Any]:
        """stdout/stderr paths of a job nsdf-hpc did not submit (while slurmctld knows it)."""
        try:
            res = self._run(["scontrol", "show", "job", "-o", job_id])
        except SchedulerError:
            return {}
        out: Dict[str, Any] = {}
        for key, field_, end in (("error", "StdErr", " StdIn="), ("output", "StdOut", " Power=")):
            m = re.search(" " + field_ + "=(.*?)" + end, res.stdout) or \
                re.search(" " + field_ + r"=(\S+)", res.stdout)
            if m and m.group(1):
                out[key] = m.group(1).replace("%", "%%")
        arr = re.search(r" ArrayTaskId=(\S+)", res.stdout)
        if arr:
            out["array"] = True
        return out

    # -------------------------------------------------------------- waiting
    def wait_all(self, jobs: Sequence["Job"], timeout: Optional[float] = None,
                 backoff: Optional[Backoff] = None) -> List[JobStatus]:
        """Wait for every job; each round is ONE status query, whatever the number of jobs."""
        backoff = backoff or Backoff(initial=self.settings.poll_initial, cap=self.settings.poll_cap,
                                     clock=self._clock, sleep=self._sleep, rng=self._rng)
        clock = backoff.clock
        deadline = None if timeout is None else clock() + timeout
        unknown_rounds = 0
        while True:
            todo = [j for j in jobs if not (j.last and j.last.final)]
            if todo:
                ids = [i for j in todo for i in j.job_ids]
                try:
                    table = self.status(ids)
                except _TransientStatusError as err:
                    logger.info("status query failed (%s); polling again", err)
                    table = None
                if table is not None:
                    grouped = group_by_job(table)
                    for j in todo:
                        j._update(table, grouped)
                    if all(j.last and j.last.state is JobState.UNKNOWN for j in todo):
                        unknown_rounds += 1
                    else:
                        unknown_rounds = 0
            if all(j.last and j.last.final for j in jobs) or unknown_rounds >= 30:
                return [j.last for j in jobs]  # type: ignore[misc]
            if deadline is not None and clock() >= deadline:
                return [j.last or JobStatus(job_id=j.job_id, state=JobState.UNKNOWN) for j in jobs]
            backoff.sleep(deadline)


def group_by_job(table: Mapping[str, JobStatus]) -> Dict[str, Dict[str, JobStatus]]:
    """``{"12": {"12_0": ..., "12_[1-9]": ...}, "13": {"13": ...}}`` (array tasks by job)."""
    out: Dict[str, Dict[str, JobStatus]] = {}
    for k, v in table.items():
        out.setdefault(k.split("_", 1)[0], {})[k] = v
    return out


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------- Job handle
class Job:
    """A submitted job (or array: one id per ``sbatch`` call) and how to follow it."""

    def __init__(self, scheduler: Slurm, job_ids: Sequence[str], *, directory: Optional[str] = None,
                 provenance: Optional[Mapping[str, Any]] = None, script: Optional[str] = None) -> None:
        self.scheduler = scheduler
        self.job_ids: Tuple[str, ...] = tuple(str(j) for j in job_ids)
        self.directory = directory
        self.provenance: Dict[str, Any] = dict(provenance or {})
        self.script = script or (os.path.join(directory, "job.sh") if directory else None)
        self.last: Optional[JobStatus] = None
        self.tasks: Dict[str, JobStatus] = {}

    def __repr__(self) -> str:
        state = self.last.state.value if self.last else "?"
        return f"<Job {','.join(self.job_ids)} {state}>"

    @property
    def job_id(self) -> str:
        return self.job_ids[0]

    @property
    def is_array(self) -> bool:
        return bool(self.provenance.get("array"))

    def _update(self, table: Mapping[str, JobStatus],
                grouped: Optional[Mapping[str, Dict[str, JobStatus]]] = None) -> JobStatus:
        grouped = grouped if grouped is not None else group_by_job(table)
        mine: Dict[str, JobStatus] = {}
        for j in self.job_ids:
            mine.update(grouped.get(j, {}))
        self.tasks = mine
        if len(mine) == 1 and not self.is_array:
            st = next(iter(mine.values()))
            self.last = st.model_copy(update={"job_id": self.job_id})
            return self.last
        expected = len(self.provenance.get("indices") or ())
        tasks = [v for k, v in mine.items() if re.fullmatch(r"\d+_\d+", k)]
        done = sum(1 for v in tasks if v.final)
        if expected and done < expected:
            # accounting lags behind: a bare "ID" line or missing task lines must not end
            # the wait; the array is final only when every task has a final line
            rest = [v for v in mine.values() if not v.final]
            if not rest:
                rest = [JobStatus(job_id=self.job_id, state=JobState.ACTIVE, native_state="RUNNING",
                                  reason=f"{done}/{expected} tasks reported final")]
            self.last = aggregate(self.job_id, [v for v in tasks if v.final] + rest)
        else:
            self.last = aggregate(self.job_id, tasks if expected else list(mine.values()))
        return self.last

    def status(self) -> JobStatus:
        """Ask the scheduler now (one call)."""
        return self._update(self.scheduler.status(self.job_ids))

    @property
    def state(self) -> JobState:
        return (self.last or self.status()).state

    @property
    def native_state(self) -> str:
        return (self.last or self.status()).native_state

    @property
    def reason(self) -> Optional[str]:
        return (self.last or self.status()).reason

    @property
    def exit_code(self) -> Optional[int]:
        return (self.last or self.status()).exit_code

    def wait(self, timeout: Optional[float] = None, backoff: Optional[Backoff] = None) -> JobStatus:
        """Poll until the job is final (or ``timeout`` s passed: check ``.final``)."""
        return self.scheduler.wait_all([self], timeout=timeout, backoff=backoff)[0]

    def cancel(self) -> None:
        self.scheduler.cancel(self.job_ids)

    # -------------------------------------------------------------- logs
    def task_ids(self) -> List[str]:
        """Slurm ids of the array's tasks (``ID_TASK``), in index order."""
        out = []
        for chunk in self.provenance.get("chunks", []):
            for t in _expand(chunk["array"].split("%")[0]):
                out.append(f"{chunk['job_id']}_{t}")
        return out or list(self.job_ids)

    def _expand_path(self, pattern: str, slurm_id: str) -> str:
        jid, _, task = slurm_id.partition("_")
        name = str(self.provenance.get("job_name", ""))
        user = os.environ.get("USER", "")
        repl = {"j": jid,
                "A": jid, "a": task or "4294967294", "x": name, "u": user, "%": "%"}
        return re.sub(r"%(\d*)([jAaxu%])", lambda m: repl[m.group(2)].zfill(int(m.group(1) or 0)),
                      pattern)

    def log_path(self, stream: str = "stdout", task: Optional[Union[int, str]] = None) -> Optional[str]:
        key = "output" if stream == "stdout" else "error"
        pattern = self.provenance.get(key)
        if not pattern:
            return None
        if task is None:
            slurm_id = self.task_ids()[0] if self.is_array else self.job_id
        elif isinstance(task, int):
            slurm_id = self.task_id(task)
        else:
            slurm_id = task
        return self._expand_path(pattern, slurm_id)

    def task_id(self, index: int) -> str:
        """The Slurm id of the array task that runs user index ``index``."""
        indices = self.provenance.get("indices") or []
        for chunk in self.provenance.get("chunks", []):
            start, stop = chunk["positions"]
            if index in indices[start:stop]:
                off = chunk["offset"]
                return f"{chunk['job_id']}_{index if off is None else indices.index(index) - off}"
        raise SpecError(f"job {self.job_id} has no array index {index}")

    def logs(self, stream: str = "stdout", tail: Optional[int] = None,
             task: Optional[Union[int, str]] = None) -> str:
        """The job's stdout (or stderr); the last ``tail`` lines only when given."""
        path = self.log_path(stream, task)
        if not path or not os.path.exists(path):
            return ""
        with open(path, "r", encoding="utf-8", errors="surrogateescape") as fh:
            text = fh.read()
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-tail:]) if tail > 0 else ""
        return text


def _expand(spec: str) -> List[int]:
    from .base import parse_array_indices
    return parse_array_indices(spec)


# ---------------------------------------------------------------------------- submission
@dataclass
class Prepared:
    """A job ready for sbatch: the rendered script(s) and the provenance record."""

    spec: JobSpec
    inputs: ScriptInputs
    chunks: List[ArrayChunk]
    script: str
    provenance: Dict[str, Any] = field(default_factory=dict)


def new_job_dir(work_dir: str, name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:40] or "job"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(work_dir, f"{stamp}-{slug}-{uuid.uuid4().hex[:8]}")


def prepare(client: Any, spec: JobSpec, slurm: Slurm, runtime: Any = None,
            dry_run: bool = False) -> Prepared:
    """Pull the image on this host, build the runtime invocation and render the script."""
    if "%" in slurm.settings.work_dir:
        raise SpecError(f"the Slurm work directory cannot contain '%': {slurm.settings.work_dir}")
    rt = client.runtime(runtime)
    static = copy.copy(client)
    static.env = {k: v for k, v in client.env.items() if not matches(k, JOB_TIME_PATTERNS)}
    cmd_spec = spec.run_spec(command=(_CMD_SENTINEL,))
    if dry_run:
        inv, native, rt = static.plan(cmd_spec, rt)
    else:
        native = client.pull(spec.image, rt)
        inv, native, rt = static.invocation(cmd_spec, rt, native)
    if not inv.argv or inv.argv[-1] != _CMD_SENTINEL:
        raise SchedulerError(f"{rt.name}: the command is not at the end of the runtime argv")
    prefix = tuple(inv.argv[:-1])
    probe_spec = cmd_spec.model_copy(update={"env": {**cmd_spec.env, _PROBE_NAME: _PROBE_VALUE}})
    pinv, _, _ = static.invocation(probe_spec, rt, native)
    fwd_env, fwd_args, fwd_index = probe_templates(inv.argv, pinv.argv, inv.env, pinv.env)
    if not dry_run:
        for d in inv.mkdirs:
            os.makedirs(d, exist_ok=True)
    job_dir = new_job_dir(slurm.settings.work_dir, spec.job_name)
    script_path = os.path.join(job_dir, "job.sh")
    out = spec.output or default_output(spec, job_dir, "out")
    err = spec.error or default_output(spec, job_dir, "err")
    chdir = spec.cwd or os.getcwd()
    chunks: List[ArrayChunk] = []
    if spec.array:
        try:
            limit = slurm.max_array_size()
        except SchedulerError:
            if not dry_run:
                raise
            limit = 1001
        chunks = split_array(spec.array, limit)
    header = (f"generated by nsdf-hpc {__version__}: {spec.image} ({native.digest or 'no digest'})",
              f"runtime {rt.name} {rt.version or ''}: {native.location}",
              f"provenance: {os.path.join(job_dir, 'provenance.json')}")
    inputs = ScriptInputs(
        prefix=prefix, fixed_env=dict(inv.env), job_dir=job_dir, script_path=script_path,
        chdir=chdir, fwd_env=fwd_env, fwd_args=fwd_args, fwd_index=fwd_index,
        forward=tuple(p for p in JOB_TIME_PATTERNS if p in client.settings.env_allow),
        deny=tuple(client.settings.env_deny),
        array_indices=spec.array.indices if spec.array else (),
        remapped=bool(chunks and chunks[0].offset is not None),
        header=header, output=out, error=err)
    # one script for every chunk: the chunk's offset is the script's first argument
    script = render_script(spec, inputs, chunks[0].array if chunks else None)
    provenance = {
        "nsdf_hpc": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "image": spec.image, "digest": native.digest, "native": native.location,
        "runtime": rt.name, "runtime_version": rt.version, "argv": list(prefix),
        "command": list(spec.command) if spec.commands is None else [list(c) for c in spec.commands],
        "script": script_path, "script_sha256": hashlib.sha256(script.encode("utf-8", "surrogateescape")).hexdigest(),
        "job_name": spec.job_name, "output": out, "error": err, "directory": job_dir,
        "array": bool(spec.array), "indices": list(spec.array.indices) if spec.array else [],
        "accounting": slurm.accounting, "job_ids": [], "chunks": [],
    }
    return Prepared(spec, inputs, chunks, script, provenance)


def submit_prepared(slurm: Slurm, prep: Prepared) -> Job:
    """Write the script and provenance, then one sbatch per array chunk."""
    job_dir = prep.inputs.job_dir
    os.makedirs(os.path.join(job_dir, "exit"), exist_ok=True)
    with open(prep.inputs.script_path, "w", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(prep.script)
    os.chmod(prep.inputs.script_path, 0o755)
    prov = prep.provenance
    ids: List[str] = []
    by_id = os.path.join(slurm.settings.work_dir, "by-id")
    os.makedirs(by_id, exist_ok=True)
    chunks = prep.chunks or [None]
    for chunk in chunks:
        if chunk is not None and chunk.offset is not None:
            jid = slurm.sbatch(prep.inputs.script_path, [str(chunk.offset)],
                               [f"--array={chunk.array}"])
        else:
            jid = slurm.sbatch(prep.inputs.script_path)
        ids.append(jid)
        slurm.dirs[jid] = job_dir
        if chunk is not None:
            prov["chunks"].append({"job_id": jid, "array": chunk.array, "offset": chunk.offset,
                                   "positions": list(chunk.positions)})
        link = os.path.join(by_id, jid)
        try:
            if os.path.islink(link):
                os.unlink(link)
            os.symlink(job_dir, link)
        except OSError as err:
            logger.debug("cannot link %s: %s", link, err)
    prov["job_ids"] = ids
    with open(os.path.join(job_dir, "provenance.json"), "w") as fh:
        json.dump(prov, fh, indent=2)
    return Job(slurm, ids, directory=job_dir, provenance=prov, script=prep.inputs.script_path)

