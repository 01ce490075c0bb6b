"""What to submit (pure, validated models): the job spec, array indices and dependencies.

* :class:`JobSpec` is a :class:`~nsdf_hpc.models.RunSpec` (what runs in the container) plus
  what the batch system needs (resources, name, output paths, array, dependencies, MPI).
* :class:`ArraySpec` holds an array's task indices (sbatch's ``--array`` syntax parsed);
  :class:`Dependency` one ``afterok``/``afterany``/``afternotok`` clause.
* Job ids are ``JOBID`` or Slurm's array-task form ``JOBID_TASK`` (``1349_10``) everywhere.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from pydantic import Field, field_validator, model_validator

from ..errors import SpecError
from ..models import Model, RunSpec, first_error, unencodable

__all__ = ["JobSpec", "Dependency", "ArraySpec", "parse_array_indices", "compress_indices",
           "parse_dependencies", "as_job_ids", "task_covered", "check_job_id", "JOB_ID", "TASK_INDEX"]

#: in an array template command, replaced by the task index inside the job
TASK_INDEX = "{index}"

#: a Slurm job id, or one task of an array (``1349_10``), as sacct/scancel/squeue take them
JOB_ID = re.compile(r"\d+(?:_\d+)?")

#: the most tasks one array may have: Slurm's own ceiling for MaxArraySize (slurm.conf(5)); a
#: larger range ("0-99999999999") would only exhaust memory while its indices are listed
MAX_ARRAY_TASKS = 4_000_001

_NAME_BAD = re.compile(r"[\x00-\x1f\x7f]")


def check_job_id(value: Union[str, int]) -> str:
    """``value`` as a job id string (``"12"`` or ``"12_3"``), or a SpecError."""
    text = str(value).strip()
    if not JOB_ID.fullmatch(text):
        raise SpecError(f"invalid job id {str(value)!r} (expected JOBID or JOBID_TASK, e.g. 1349 or 1349_10)")
    return text


class Dependency(Model):
    """``afterok`` / ``afterany`` / ``afternotok`` on one or more job ids."""

    kind: str
    job_ids: Tuple[str, ...]

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        if value not in ("afterok", "afterany", "afternotok"):
            raise ValueError(f"dependency type {value!r}: use afterok, afterany or afternotok")
        return value

    @field_validator("job_ids")
    @classmethod
    def _ids(cls, value: Tuple[str, ...]) -> Tuple[str, ...]:
        if not value:
            raise ValueError("a dependency needs at least one job id")
        for v in value:
            if not JOB_ID.fullmatch(v):
                raise ValueError(f"invalid job id {v!r} in a dependency")
        return value


class ArraySpec(Model):
    """The task indices of an array job and how many may run at once (``%throttle``)."""

    indices: Tuple[int, ...]
    throttle: Optional[int] = Field(default=None, ge=1)

    @field_validator("indices")
    @classmethod
    def _indices(cls, value: Tuple[int, ...]) -> Tuple[int, ...]:
        if not value:
            raise ValueError("an array needs at least one index")
        if any(i < 0 for i in value):
            raise ValueError("array indices must be >= 0")
        if len(set(value)) != len(value):
            raise ValueError("array indices must be unique")
        return tuple(sorted(value))

    @classmethod
    def parse(cls, text: str) -> "ArraySpec":
        """``0-99``, ``1,3,5-9:2``, ``0-999%10`` (sbatch's --array syntax)."""
        body, _, thr = text.partition("%")
        if thr and not thr.isdigit():
            raise SpecError(f"invalid --array {text!r}: the limit after '%' must be a number "
                            "(e.g. 0-99%10)")
        try:
            return cls(indices=tuple(parse_array_indices(body)),
                       throttle=int(thr) if thr else None)
        except ValueError as err:   # first_error: one line, also for pydantic's errors
            raise SpecError(f"invalid --array {text!r}: {first_error(err)}") from None


def parse_array_indices(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m:
            raise ValueError(f"cannot read {part!r} (expected N, N-M or N-M:STEP)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        step = int(m.group(3)) if m.group(3) else 1
        if hi < lo or step < 1:
            raise ValueError(f"empty range {part!r}")
        span = range(lo, hi + 1, step)
        if len(out) + len(span) > MAX_ARRAY_TASKS:   # checked before the list is built
            raise ValueError(f"more than {MAX_ARRAY_TASKS} tasks (Slurm's largest MaxArraySize); "
                             "split the work into several arrays")
        out.extend(span)
    return out


def compress_indices(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"``."""
    parts: List[str] = []
    items = sorted(indices)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)


class JobSpec(RunSpec):
    """A :class:`RunSpec` plus the batch system's resources and options.

    ``commands`` (one argv per array task, in index order) or a ``command`` containing
    ``{index}`` make an array together with ``array``. ``extra_directives`` are added as
    ``#SBATCH`` lines verbatim after validation (one option each, e.g. ``--mail-type=END``).
    """

    nodes: Optional[int] = Field(default=None, ge=1)
    ntasks: Optional[int] = Field(default=None, ge=1)
    ntasks_per_node: Optional[int] = Field(default=None, ge=1)
    cpus_per_task: Optional[int] = Field(default=None, ge=1)
    mem: Optional[str] = None            # sbatch syntax: 500M, 4G
    gpus: Optional[str] = None           # sbatch --gpus syntax: 2, a100:2
    time: Optional[str] = None           # sbatch syntax: 30, 1:00:00, 1-00:00:00
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    exclusive: bool = False
    job_name: str = "nsdf"
    output: Optional[str] = None         # sbatch patterns allowed (%j, %A, %a, %x)
    error: Optional[str] = None
    array: Optional[ArraySpec] = None
    commands: Optional[Tuple[Tuple[str, ...], ...]] = None
    dependencies: Tuple[Dependency, ...] = ()
    extra_directives: Tuple[str, ...] = ()
    mpi: Optional[str] = None            # None | "pmix" | "pmi2" (srun --mpi=..., one container per rank)

    @field_validator("job_name")
    @classmethod
    def _job_name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the job name is empty")
        if _NAME_BAD.search(value):
            raise ValueError(f"job name {value!r} contains a control character (newline, tab, ...)")
        if len(value.encode("utf-8", "surrogateescape")) > 200:
            raise ValueError("the job name is longer than 200 bytes")
        return value

    @field_validator("mem", "gpus", "time", "partition", "account", "qos", "constraint",
                     "output", "error")
    @classmethod
    def _one_line(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not value or _NAME_BAD.search(value)):
            raise ValueError(f"{value!r} is empty or contains a control character")
        return value

    @field_validator("mem")
    @classmethod
    def _mem(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"\d+[KMGT]?B?", value, re.I):
            raise ValueError(f"invalid memory {value!r} (e.g. 500M, 4G)")
        return value

    @field_validator("time")
    @classmethod
    def _time(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(
                r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE", value, re.I):
            raise ValueError(f"invalid time {value!r} (e.g. 30, 1:00:00, 2-00:00:00)")
        return value

    @field_validator("mpi")
    @classmethod
    def _mpi(cls, value: Optional[str]) -> Optional[str]:
        if value not in (None, "pmix", "pmi2", "none"):
            raise ValueError(f"mpi {value!r}: use pmix, pmi2 or none")
        return None if value == "none" else value

    @field_validator("extra_directives")
    @classmethod
    def _extra(cls, value: Tuple[str, ...]) -> Tuple[str, ...]:
        for d in value:
            if not d.startswith("-") or _NAME_BAD.search(d):
                raise ValueError(f"extra directive {d!r} must be one sbatch option on one line "
                                 "(e.g. --mail-type=END)")
            if d.split("=", 1)[0] in ("--wrap", "--export"):
                raise ValueError(f"{d.split('=', 1)[0]} is set by nsdf-hpc and cannot be overridden")
        return value

    @model_validator(mode="after")
    def _array_commands(self) -> "JobSpec":
        if self.commands is not None:
            if self.array is None:
                object.__setattr__(self, "array", ArraySpec(indices=tuple(range(len(self.commands)))))
            if len(self.commands) != len(self.array.indices):  # type: ignore[union-attr]
                raise ValueError(f"{len(self.commands)} commands for "
                                 f"{len(self.array.indices)} array indices")  # type: ignore[union-attr]
            for c in self.commands:
                if not c or any("\0" in a or unencodable(a) for a in c):
                    raise ValueError("an array command is empty or contains a NUL byte "
                                     "or a lone surrogate")
        return self

    def run_spec(self, command: Optional[Sequence[str]] = None) -> RunSpec:
        """The container part, as the runtime layer takes it."""
        fields = {k: getattr(self, k) for k in RunSpec.model_fields}
        if command is not None:
            fields["command"] = tuple(command)
        return RunSpec(**fields)


def as_job_ids(items: Union[None, str, int, Any, Iterable[Any]]) -> Tuple[str, ...]:
    """Job ids from ids, ``Job`` objects (anything with ``job_ids``) or lists of them."""
    if items is None:
        return ()
    if isinstance(items, (str, int)):
        return (str(items),)
    if hasattr(items, "job_ids"):
        return tuple(items.job_ids)
    out: List[str] = []
    for it in items:
        out.extend(as_job_ids(it))
    return tuple(out)


def task_covered(task: str, key: str) -> bool:
    """Whether a status line keyed ``key`` (``12_3``, or a pending range ``12_[0-9%2]`` as
    sacct and scontrol print it) answers for array task ``task`` (``12_3``)."""
    if key == task:
        return True
    base, _, t = task.partition("_")
    if not t or not key.startswith(base + "_[") or not key.endswith("]"):
        return False
    try:
        return int(t) in parse_array_indices(key[len(base) + 2:-1].split("%")[0])
    except ValueError:
        return False


def parse_dependencies(value: Any) -> Tuple[Dependency, ...]:
    """Dependencies from sbatch text (``"afterok:1:2,afterany:3"``), a mapping
    ``{"afterok": [job, "12"]}`` or a sequence of :class:`Dependency`."""
    if value is None or value == "" or value == ():
        return ()
    try:
        if isinstance(value, str):
            out = []
            for part in value.split(","):
                kind, _, ids = part.strip().partition(":")
                out.append(Dependency(kind=kind, job_ids=tuple(i for i in ids.split(":") if i)))
            return tuple(out)
        if isinstance(value, Mapping):
            return tuple(Dependency(kind=k, job_ids=as_job_ids(v)) for k, v in value.items())
        return tuple(d if isinstance(d, Dependency) else Dependency(**d) for d in value)
    except ValueError as err:
        raise SpecError(f"invalid dependency {value!r}: {first_error(err)}") from None
