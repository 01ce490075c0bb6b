"""The Job handle: status, wait (one status query per poll round), cancel, logs and follow.

A :class:`Job` holds one id per ``sbatch`` call (a split array has several), or one array
task (``1349_10``). It asks its backend (:class:`~nsdf_hpc.schedulers.slurm.Slurm`, or
anything with ``status``/``cancel``/``backoff``) and reads the log files Slurm writes.
"""
from __future__ import annotations

import logging
import os
import re
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional,
                    Sequence, Tuple, Union)

from ..errors import SchedulerError, SpecError
from .backoff import Backoff
from .spec import parse_array_indices, task_covered
from .states import JobState, JobStatus, aggregate

if TYPE_CHECKING:
    from .slurm import Slurm

__all__ = ["Job", "QuerySchedule", "wait_all", "group_by_job"]

logger = logging.getLogger(__name__)


def group_by_job(table: Mapping[str, JobStatus]) -> Dict[str, Dict[str, JobStatus]]:
    """``{"12": {"12_0": ..., "12_[1-9]": ...}, "13": {"13": ...}}`` (array tasks by job)."""
    out: Dict[str, Dict[str, JobStatus]] = {}
    for k, v in table.items():
        out.setdefault(k.split("_", 1)[0], {})[k] = v
    return out


#: how often the exit-code files are looked at between scheduler queries (a stat of a
#: directory on the shared work directory: it costs the scheduler nothing)
WATCH_INTERVAL = 0.1


def watch_schedule(backoff: Backoff) -> Backoff:
    """The scheduler-query schedule while the exit-code files are watched: they tell when a
    job ended, so the queries only back them up (a job cancelled, timed out, or whose node
    died writes none): 10 s, then x1.5 up to the cap, with the settings' jitter (defaults: the
    first query after 8-10 s, then every 12-15 s: at most 5 a minute, plus the confirmation)."""
    return backoff.derive(initial=10.0, factor=1.5)


def confirm_schedule(backoff: Backoff) -> Backoff:
    """Once every exit-code file is there: query 0.1 s later (slurmctld and the accounting
    need a moment to record the end), then 0.2, 0.4, ... up to the cap."""
    return backoff.derive(initial=0.1, factor=2.0, jitter=0.0)


class QuerySchedule:
    """When to ask the scheduler about jobs whose end may also show in their exit-code files:
    the one schedule of ``wait_all`` and of the Executor's collector (``executor._JobWatch``).

    While the files are watched (``awaiting_files``), ``backoff`` is the backstop for a task
    that writes none (``watch_schedule``). Once every file is there (``files_done``), the
    queries confirm the end on ``confirm_schedule``. A confirmation that reaches the cap
    without a final state (a job requeued after its files were written, an accounting that
    lags) goes back to ``backoff`` for good, so such a job never costs more than the backstop.
    Without files (``watching`` false), ``backoff`` is the plain schedule.
    """

    def __init__(self, backoff: Backoff, watching: bool) -> None:
        self.watching = watching
        self.clock = backoff.clock
        self._backoff = backoff
        self._current = backoff
        self._confirmed = False

    @classmethod
    def start(cls, base: Backoff, watching: bool) -> "QuerySchedule":
        """A schedule of its own from the settings' ``base``: the watch schedule when
        ``watching``, else a copy of ``base``."""
        return cls(watch_schedule(base) if watching else base.derive(base.initial, base.factor), watching)

    @property
    def awaiting_files(self) -> bool:
        """The exit-code files are watched and have not yet all been seen."""
        return self.watching and not self._confirmed

    def files_done(self) -> None:
        """Every exit-code file is there: the next queries confirm the end, soon."""
        if self.awaiting_files:
            self._confirmed = True
            self._current = confirm_schedule(self._backoff)

    def next_interval(self) -> float:
        """Seconds to the next query."""
        if self._current is not self._backoff and self._current.at_cap:
            self._current = self._backoff
        return self._current.next_interval()

    def pause(self, dt: float) -> None:
        self._backoff.pause(dt)

    def sleep(self, deadline: Optional[float] = None) -> None:
        """Sleep to the next query (never past ``deadline``, a ``clock()`` value)."""
        dt = self.next_interval()
        if deadline is not None:
            dt = min(dt, deadline - self.clock())
        if dt > 0:
            self.pause(dt)


def wait_all(jobs: Sequence["Job"], timeout: Optional[float] = None,
             backoff: Optional[Backoff] = None) -> List[JobStatus]:
    """Wait for every job; each round is ONE status query, whatever the number of jobs.

    The jobs share the first one's backend; ``backoff`` defaults to its settings' schedule.
    Jobs submitted by nsdf-hpc leave an exit-code file per task in their directory
    (``script.py``): these are watched every ``WATCH_INTERVAL`` s between queries, so the end
    is noticed within about 0.1 s plus one confirming query, and the queries themselves can
    be few (``QuerySchedule``).
    """
    if not jobs:
        return []
    scheduler = jobs[0].scheduler
    watching = all(j.exit_files_done() is not None for j in jobs)
    plan = (QuerySchedule.start(scheduler.backoff(), watching) if backoff is None
            else QuerySchedule(backoff, watching))
    clock = plan.clock
    deadline = None if timeout is None else clock() + timeout
    unknown_rounds = 0
    # watching: no query before the files or the first backstop interval say to make one
    skip_query = watching
    while True:
        todo = [j for j in jobs if not (j.last and j.last.final)]
        if todo and skip_query:
            skip_query = False
        elif todo:
            ids = [i for j in todo for i in j.job_ids]
            table: Optional[Dict[str, JobStatus]]
            try:
                table = scheduler.status(ids)
            except SchedulerError as err:
                if not getattr(err, "transient", False):
                    raise
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
        if deadline is not None and clock() >= deadline and all(j.last for j in jobs):
            return [j.last or JobStatus(job_id=j.job_id, state=JobState.UNKNOWN) for j in jobs]
        todo = [j for j in jobs if not (j.last and j.last.final)]
        if not plan.awaiting_files:
            plan.sleep(deadline)
        elif _sleep_watching(todo, plan, deadline):
            plan.files_done()   # every file is there: confirm soon
            plan.sleep(deadline)


def _sleep_watching(jobs: Sequence["Job"], plan: QuerySchedule, deadline: Optional[float]) -> bool:
    """Sleep the next interval of ``plan``, looking at the exit-code files meanwhile;
    True as soon as every job has all of them."""
    clock = plan.clock
    end = clock() + plan.next_interval()
    if deadline is not None:
        end = min(end, deadline)
    while True:
        if all(j.exit_files_done() for j in jobs):
            return True
        left = end - clock()
        if left <= 0:
            return False
        plan.pause(min(WATCH_INTERVAL, left))


class Job:
    """A submitted job (or array: one id per ``sbatch`` call; or one array task)."""

    def __init__(self, scheduler: "Slurm", job_ids: Sequence[str], *, directory: Optional[str] = None,
                 provenance: Optional[Mapping[str, Any]] = None, script: Optional[str] = None,
                 user: str = "", paths: Optional[Callable[[], Mapping[str, Any]]] = None) -> None:
        self.scheduler = scheduler
        self.job_ids: Tuple[str, ...] = tuple(str(j) for j in job_ids)
        self.directory = directory
        self.provenance: Dict[str, Any] = dict(provenance or {})
        self.script = script or (os.path.join(directory, "job.sh") if directory else None)
        self.user = user                    # for %u in log patterns (never read from os.environ)
        # a job nsdf-hpc did not submit: its log paths, asked of slurmctld when a log is read
        # (not at attach: `status` and `cancel` stay one scheduler call each)
        self._paths = paths
        self.last: Optional[JobStatus] = None
        self.tasks: Dict[str, JobStatus] = {}
        self._files_done = False

    def __repr__(self) -> str:
        state = self.last.state.value if self.last else "?"
        return f"<Job {','.join(self.job_ids)} {state}>"

    @property
    def job_id(self) -> str:
        return self.job_ids[0]

    @property
    def is_array(self) -> bool:
        return bool(self.provenance.get("array"))

    @property
    def is_task(self) -> bool:
        """One task of an array (``1349_10``)."""
        return "_" in self.job_id

    def _update(self, table: Mapping[str, JobStatus],
                grouped: Optional[Mapping[str, Dict[str, JobStatus]]] = None) -> JobStatus:
        grouped = grouped if grouped is not None else group_by_job(table)
        mine: Dict[str, JobStatus] = {}
        for j in self.job_ids:
            if "_" in j:    # one task: its own line, or the pending range that holds it
                hits = {k: v for k, v in grouped.get(j.split("_", 1)[0], {}).items() if task_covered(j, k)}
                mine.update({j: v.model_copy(update={"job_id": j}) for v in list(hits.values())[:1]})
            else:
                mine.update(grouped.get(j, {}))
        self.tasks = mine
        # a job without provenance (not submitted by nsdf-hpc) is an array when Slurm lists tasks
        array = self.is_array if "array" in self.provenance else any("_" in k for k in mine)
        if len(mine) == 1 and not array:
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

    def exit_files_done(self) -> Optional[bool]:
        """Whether every task has left its exit-code file (``exit/ID`` or ``exit/ID_TASK``,
        written by the batch script as its last step); None when there is nothing to watch
        (a job without its nsdf-hpc directory)."""
        if not self.directory:
            return None
        if self._files_done:      # files are never removed: one look per tick for the others only
            return True
        try:
            names = [n for n in os.listdir(os.path.join(self.directory, "exit")) if not n.endswith(".tmp")]
        except OSError:
            # the script makes exit/ when its first task ends: before that, none is there yet
            return False if os.path.isdir(self.directory) else None
        expected = len(self.provenance.get("indices") or ())
        if self.is_array and expected:
            prefixes = tuple(f"{j}_" for j in self.job_ids)
            self._files_done = sum(1 for n in names if n.startswith(prefixes)) >= expected
        else:
            have = set(names)
            self._files_done = all(j in have for j in self.job_ids)
        return self._files_done

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
        return wait_all([self], timeout=timeout, backoff=backoff)[0]

    def cancel(self) -> None:
        """One scancel (for a task handle, only that task)."""
        self.scheduler.cancel(self.job_ids)

    # -------------------------------------------------------------- logs
    def task_ids(self) -> List[str]:
        """Slurm ids of the array's tasks (``ID_TASK``), in index order."""
        out = []
        for chunk in self.provenance.get("chunks", []):
            for t in parse_array_indices(chunk["array"].split("%")[0]):
                out.append(f"{chunk['job_id']}_{t}")
        return out or list(self.job_ids)

    def _expand_path(self, pattern: str, slurm_id: str) -> str:
        jid, _, task = slurm_id.partition("_")
        name = str(self.provenance.get("job_name", ""))
        repl = {"j": jid, "A": jid, "a": task or "4294967294", "x": name, "u": self.user, "%": "%"}
        return re.sub(r"%(\d*)([jAaxu%])", lambda m: repl[m.group(2)].zfill(int(m.group(1) or 0)),
                      pattern)

    def log_path(self, stream: str = "stdout", task: Optional[Union[int, str]] = None) -> Optional[str]:
        """The file Slurm writes ``stream`` of this job (an array: task 0, or ``task``) to."""
        if self._paths is not None:
            ask, self._paths = self._paths, None
            self.provenance = {**ask(), **self.provenance}   # what attach decided stays
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
        """The job's stdout (or stderr); the last ``tail`` lines only when given.

        For a whole array (no ``task``) every task's log, each headed ``==> ID_TASK <==``
        (as ``tail`` heads several files), ``tail`` applying to each.
        """
        if task is None and self.is_array and self.provenance.get("chunks"):
            parts = []
            for tid in self.task_ids():
                parts.append(f"==> {tid} <==\n" + _read_tail(self.log_path(stream, tid), tail))
            return "\n".join(parts)
        return _read_tail(self.log_path(stream, task), tail)

    def follow(self, stream: str = "stdout", task: Optional[Union[int, str]] = None,
               backoff: Optional[Backoff] = None,
               opener: Callable[[str], Any] = lambda p: open(p, "rb")) -> Iterator[bytes]:
        """Yield the log's new bytes as Slurm writes them, until the job is final.

        Polls the file (short intervals after new output, longer when idle) and asks the
        scheduler only when nothing new was written; the file's last bytes are read after
        the job is final, so nothing written at the end is lost. Bytes, not text: a log may
        hold anything, and a CLI writes them to ``sys.stdout.buffer`` unchanged.
        """
        path = self.log_path(stream, task)
        if path is None:
            raise SchedulerError(f"job {self.job_id}: no log path known (not submitted by nsdf-hpc "
                                 "here, and slurmctld no longer knows it)")
        backoff = backoff or Backoff(initial=0.5, cap=5.0)
        pos = 0
        while True:
            chunk = _read_from(path, pos, opener)
            if chunk:
                pos += len(chunk)
                yield chunk
                backoff.reset()
            elif self.status().final:
                rest = _read_from(path, pos, opener)
                if rest:
                    yield rest
                return
            backoff.sleep()

    def follow_lines(self, stream: str = "stdout", task: Optional[Union[int, str]] = None,
                     backoff: Optional[Backoff] = None) -> Iterator[str]:
        """:meth:`follow` as text lines (a last line without newline is yielded at the end)."""
        buf = b""
        for chunk in self.follow(stream, task, backoff):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "surrogateescape") + "\n"
        if buf:
            yield buf.decode("utf-8", "surrogateescape")


def _read_from(path: str, pos: int, opener: Callable[[str], Any]) -> bytes:
    try:
        with opener(path) as fh:
            fh.seek(pos)
            return bytes(fh.read())
    except FileNotFoundError:
        return b""


def _read_tail(path: Optional[str], tail: Optional[int]) -> str:
    if not path or not os.path.exists(path):
        return ""
    with open(path, "r", encoding="utf-8", errors="surrogateescape") as fh:
        text = fh.read()
    if tail is not None:
        lines = text.splitlines(keepends=True)
        text = "".join(lines[-tail:]) if tail > 0 else ""
    return text
