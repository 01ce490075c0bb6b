"""The batch script (pure): #SBATCH directives, their quoting, array splitting, rendering.

The script calls the container runtime directly with the exact argv and process environment
the runtime layer builds, under ``env -i``; Slurm/MPI variables set per rank (``SLURM_*``,
``PMI*``, ...) are forwarded into the container the way that runtime takes variables (found
by :func:`forwarding_templates`, from the runtime's one environment encoding).
Arrays are split by ``MaxArraySize``: it caps the *index*, so N tasks cost
ceil(N / MaxArraySize) ``sbatch`` calls, each chunk indexed from 0 and mapped back inside the job.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple

from ..environment import EnvEncoding
from ..environment import dq_escape
from ..errors import SpecError
from .spec import TASK_INDEX, ArraySpec, JobSpec, compress_indices

__all__ = ["JOB_TIME_PATTERNS", "PROBE_NAME", "PROBE_VALUE", "CMD_SENTINEL", "BIND_PROBE", "ArrayChunk",
           "split_array", "sbatch_quote", "ScriptInputs", "default_output", "directives",
           "uses_srun", "render_script", "forwarding_templates"]

logger = logging.getLogger(__name__)

#: Variables Slurm and MPI set per job step or rank: never taken from the submit host,
#: forwarded into the container from each rank's own environment instead.
JOB_TIME_PATTERNS: Tuple[str, ...] = (
    "SLURM_*", "SLURMD_*", "SRUN_*", "PMI*", "PMIX_*", "OMPI_*", "*_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
)
PROBE_NAME = "NSDFPROBEVARNAME"
PROBE_VALUE = "NSDFPROBEVARVALUE"
CMD_SENTINEL = "NSDFCMDSENTINEL"
BIND_PROBE = "/NSDFBINDPROBE"


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
    """Whether the indices are one run (the task index is then arithmetic, no lookup table)."""
    return idx[-1] - idx[0] + 1 == len(idx)


# ---------------------------------------------------------------------------- quoting
_SBATCH_PLAIN = re.compile(r"[^\s\\'\"#]+")   # what sbatch reads as one word, unquoted


def sbatch_quote(value: str) -> str:
    """Quote a value for an ``#SBATCH`` line as sbatch itself parses it: inside double
    quotes whitespace and ``#`` are literal, and a backslash escapes the next character
    (``\\"``, ``\\\\``). shlex.quote is not enough there: sbatch treats a backslash inside
    single quotes as an escape too, and an escaped space still ends the word."""
    if "\n" in value or "\r" in value or "\0" in value:
        raise SpecError(f"an #SBATCH value cannot contain a newline or NUL: {value!r}")
    if value and _SBATCH_PLAIN.fullmatch(value):
        return value
    return '"' + "".join("\\" + c if c in '\\"' else c for c in value) + '"'


def _dq_template(template: str) -> str:
    """A probe template ("--env=NAME=VALUE") as a bash double-quoted word over ``$n``."""
    body = dq_escape(template)
    return '"' + body.replace(PROBE_NAME, "${n}").replace(PROBE_VALUE, "${!n}") + '"'


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
    requires: Tuple[str, ...] = ()          # paths the runtime reads (the cached image)
    use_lock: str = ""                      # the cache entry's use lock (ImageCache.use_path)
    image: str = ""                         # what the user asked for, for the message
    #: how the runtime binds one more directory (BIND_PROBE stands for it): each rank binds
    #: its PMIx server directory ($PMIX_SERVER_TMPDIR) at its own path, as nsdf-run run does
    rank_bind: Tuple[str, ...] = ()
    rank_mkdirs: Tuple[str, ...] = ()       # mount points to make first (BIND_PROBE, as above)


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


def _with_var(word: str, marker: str, var: str) -> str:
    """``word`` quoted for bash, with ``marker`` replaced by the expansion of ``var``."""
    return f'"${{{var}}}"'.join(shlex.quote(p) if p else "" for p in word.split(marker)) or f'"${{{var}}}"'


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
    if inputs.use_lock:
        # held (shared) on fd 9 while the container runs, which the runtime inherits: a prune
        # keeps the image; one that is removing it finishes first (then the check below fails)
        L.append(f"  if {{ exec 9<>{shlex.quote(inputs.use_lock)}; }} 2>/dev/null; then "
                 "command -v flock >/dev/null && flock -s 9; fi")
    for p in inputs.requires:
        # an image pruned while the job was queued: nothing runs, exit 125 as nsdf-run does
        msg = (f"nsdf-hpc: the image {inputs.image} is no longer in the cache ({p} is gone; "
               "pruned since submission?): pull it again and resubmit")
        L.append(f"  [ -e {shlex.quote(p)} ] || {{ echo {shlex.quote(msg)} >&2; exit 125; }}")
    env_words = " ".join(shlex.quote(f"{k}={v}") for k, v in inputs.fixed_env.items())
    head = " ".join(shlex.quote(a) for a in inputs.prefix[:inputs.fwd_index])
    tail = " ".join(shlex.quote(a) for a in inputs.prefix[inputs.fwd_index:])
    bind = ""
    if inputs.rank_bind:
        # srun --mpi=pmix: this rank's PMIx server directory, if it is a plain absolute path
        L.append('  local nsdf_bind=() nsdf_d="${PMIX_SERVER_TMPDIR-}"')
        L.append('  nsdf_d="${nsdf_d%/}"')
        L.append('  case "$nsdf_d" in /?*) case "$nsdf_d" in *[:,]*) nsdf_d= ;; esac ;; *) nsdf_d= ;; esac')
        L.append('  if [ -n "$nsdf_d" ] && [ -d "$nsdf_d" ]; then')
        for d in inputs.rank_mkdirs:
            L.append(f"    mkdir -p -- {_with_var(d, BIND_PROBE, 'nsdf_d')} 2>/dev/null || true")
        words = " ".join(_with_var(w, BIND_PROBE, "nsdf_d") for w in inputs.rank_bind)
        L.append(f"    nsdf_bind=({words})")
        L.append("  fi")
        bind = ' "${nsdf_bind[@]}"'
    run = [f"/usr/bin/env -i {env_words} \"${{fwd_env[@]}}\" \\",
           f"    {head} \"${{fwd_arg[@]}}\"{bind} {tail} \"${{NSDF_CMD[@]}}\""]
    if uses_srun(spec):
        # one rank of several: not exec'd, so that it can leave its own exit status, the time
        # it ended and whether a signal reached it (srun's --kill-on-bad-exit, scancel) in
        # $NSDF_RANKS_DIR; the batch step then reports the first rank that failed by itself,
        # not one killed because of it (srun alone reports 15 or the killed rank's 143)
        L.append("  local rc nsdf_sig=0")
        L.append("  trap 'nsdf_sig=1' TERM INT HUP")
        L.append(f"  {run[0]}")
        L.append(f"  {run[1]}")
        L.append("  rc=$?")
        L.append('  local f="$NSDF_RANKS_DIR/${SLURM_PROCID-0}"')
        L.append('  printf \'%s %s %s\\n\' "$rc" "${EPOCHREALTIME//[.,]/}" "$nsdf_sig" > "$f.tmp" '
                 '&& mv -f "$f.tmp" "$f"')
        L.append('  exit "$rc"')
    else:
        L.append(f"  exec {run[0]}")
        L.append(f"  {run[1]}")
    L.append("}")
    L.append('if [ "${1-}" = --nsdf-rank ]; then nsdf_rank; fi')
    L.append("")
    # which task this is, and where its exit code goes
    if spec.array:
        idx = inputs.array_indices
        if not inputs.remapped:
            L.append('NSDF_TASK_INDEX=$SLURM_ARRAY_TASK_ID')
        else:
            # the chunk's offset: sbatch passes it as $1; slurmrestd in the environment
            # (script arguments crash slurmrestd 22.05, see rest_api.py)
            L.append('NSDF_OFFSET=${1:-${NSDF_ARRAY_OFFSET:-0}}')
            if _contiguous(idx):
                L.append(f'NSDF_TASK_INDEX=$(( {idx[0]} + NSDF_OFFSET + SLURM_ARRAY_TASK_ID ))')
            else:
                L.append(f"NSDF_INDICES=({' '.join(map(str, idx))})")
                L.append('NSDF_TASK_INDEX=${NSDF_INDICES[$(( NSDF_OFFSET + SLURM_ARRAY_TASK_ID ))]}')
        L.append('NSDF_EXIT_FILE="$NSDF_JOB_DIR/exit/${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"')
    else:
        L.append("NSDF_TASK_INDEX=0")
        L.append('NSDF_EXIT_FILE="$NSDF_JOB_DIR/exit/$SLURM_JOB_ID"')
    L.append("export NSDF_TASK_INDEX")
    if uses_srun(spec):
        srun = ["srun", "--export=ALL", "--kill-on-bad-exit=1"]
        if spec.mpi:
            srun.append(f"--mpi={spec.mpi}")
        L.append('NSDF_RANKS_DIR="$NSDF_JOB_DIR/ranks/$SLURM_JOB_ID"')
        L.append('rm -rf "$NSDF_RANKS_DIR" && mkdir -p "$NSDF_RANKS_DIR" && export NSDF_RANKS_DIR')
        L.append(" ".join(shlex.quote(a) for a in srun) + ' /bin/bash "$NSDF_SCRIPT" --nsdf-rank')
        L += ["rc=$?",
              # the first rank (by the time it ended) that failed without a signal reaching it
              'if [ "$rc" -ne 0 ]; then',
              '  nsdf_t=""',
              '  for f in "$NSDF_RANKS_DIR"/*; do',
              '    [ -f "$f" ] && read -r r t s < "$f" || continue',
              '    if [ "$s" = 0 ] && [ "$r" != 0 ] && { [ -z "$nsdf_t" ] || [ "$t" -lt "$nsdf_t" ]; }; then',
              '      rc=$r; nsdf_t=$t',
              '    fi',
              '  done',
              'fi']
    else:
        L += ["( nsdf_rank )", "rc=$?"]
    L += [
          'mkdir -p "$NSDF_JOB_DIR/exit" && printf \'%s\\n\' "$rc" > "$NSDF_EXIT_FILE.tmp" '
          '&& mv -f "$NSDF_EXIT_FILE.tmp" "$NSDF_EXIT_FILE"',
          'exit "$rc"']
    return "\n".join(L) + "\n"


def forwarding_templates(encoding: EnvEncoding, head_len: int
                         ) -> Tuple[Tuple[str, ...], Tuple[str, ...], int]:
    """How the runtime takes one more container variable at job time, from its one
    environment encoding (pure): process-env templates, argv templates, and where in the
    prefix the argv words go (``head_len``: the runtime words before them)."""
    pair = f"{PROBE_NAME}={PROBE_VALUE}"
    if encoding.mode == "argv":
        return (), (encoding.flag, pair), head_len
    if encoding.mode == "prefix":
        return (encoding.prefix + pair,), (), head_len
    return (pair,), (), head_len

