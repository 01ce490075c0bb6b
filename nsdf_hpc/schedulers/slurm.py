"""The Slurm command backend: THE ONLY place in :mod:`nsdf_hpc.schedulers` that runs commands.

Every argv comes from :mod:`.commands` (pure) and goes through the injected
:class:`~nsdf_hpc._exec.CommandRunner`; every answer is parsed there too.

* ``sbatch --parsable SCRIPT [OFFSET]`` submits a script file (never ``--wrap``); transient
  errors ("Socket timed out", "Unable to contact slurm controller", QOSMaxSubmitJobPerUserLimit)
  are retried with backoff.
* Status of any number of jobs is ONE ``sacct --parsable2 --noheader -X -j ID,ID,...`` call
  (plus one ``scontrol show job -o`` only while some job is not in the database yet: just
  submitted, or held, since slurmctld records jobs when they become eligible).
* Accounting: ``settings.accounting`` is ``auto``, ``sacct`` or ``none``. With ``auto`` the
  first sacct answer "Slurm accounting storage is disabled" decides it ONCE for this backend:
  :attr:`Slurm.accounting` then reads ``"none"`` and sacct is never asked again (the decision
  is the return value of :meth:`Slurm.query_status`, recorded by :meth:`Slurm.status`, and it
  never goes back). Without accounting, ONE ``scontrol show job -o`` call and the job's
  exit-code file stand in, and every status says so (``accounting=False``, ``source``).
* Ids are ``JOBID`` or one array task ``JOBID_TASK`` (status, cancel and attach take both).

The environment of the Slurm commands is the ``env`` given (``SBATCH_*`` removed: inherited
ones would silently change what the script asks for); ``env=None`` lets the runner use its own.
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .._exec import CommandRunner, CompletedCommand, Started, SubprocessRunner
from ..config import SlurmSettings, load_slurm_settings
from ..errors import (CommandError, CommandTimeoutError, NsdfError, SchedulerError, SubmitError,
                      ToolNotFoundError, UnexpectedOutputError)
from . import commands as cmd
from .backoff import Backoff
from .job import Job, wait_all
from .spec import check_job_id, task_covered
from .states import JobState, JobStatus

__all__ = ["Slurm", "TransientStatusError"]

logger = logging.getLogger(__name__)

#: an ``sbatch`` started ahead longer ago than this (s) is not used: it read the cluster's
#: configuration when it started (:meth:`Slurm.start_ahead`)
AHEAD_MAX_AGE = 300.0


class TransientStatusError(SchedulerError):
    """A status query failed in a way a later poll may not (controller restarting, ...)."""

    transient = True


def _base(job_id: str) -> str:
    return job_id.split("_", 1)[0]


class Slurm:
    """The Slurm command-line backend (``sbatch``, ``sacct``, ``scontrol``, ``scancel``)."""

    name = "slurm"
    backend = "commands"
    #: why this backend was chosen (set by :func:`nsdf_hpc.schedulers.get_backend`)
    choice_reason = "constructed directly"

    def __init__(self, runner: Optional[CommandRunner] = None,
                 settings: Optional[SlurmSettings] = None, *,
                 env: Optional[Mapping[str, str]] = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic,
                 rng: Optional[random.Random] = None, **overrides: Any) -> None:
        self.runner: CommandRunner = runner or SubprocessRunner()
        self.env: Optional[Dict[str, str]] = (
            None if env is None else {k: v for k, v in env.items() if not k.startswith("SBATCH_")})
        self.settings = settings or load_slurm_settings(env, **overrides)
        self._sleep, self._clock = sleep, clock
        self._rng = rng or random.Random()
        # decided at most once (auto -> none when sacct says accounting is disabled)
        self._accounting_disabled = False
        self._max_array: Optional[int] = None
        self.dirs: Dict[str, str] = {}          # job id -> job directory (exit-code files)
        self.calls = 0                          # scheduler commands run (status/submit/cancel)
        self._ahead: Optional[Started] = None   # the next sbatch, started ahead (start_ahead)
        self._ahead_lock = threading.Lock()
        self._ahead_off = False                 # an ahead one ended by itself: not again

    @property
    def user(self) -> str:
        """``$USER`` of the environment given (``%u`` in log path patterns)."""
        return (self.env or {}).get("USER", "")

    @property
    def accounting(self) -> str:
        """The configured mode, or ``"none"`` once sacct said accounting is disabled."""
        return "none" if self._accounting_disabled else self.settings.accounting

    def backoff(self) -> Backoff:
        """The poll schedule of ``wait`` from the settings, on this backend's clock."""
        return Backoff(initial=self.settings.poll_initial, cap=self.settings.poll_cap,
                       clock=self._clock, sleep=self._sleep, rng=self._rng)

    # -------------------------------------------------------------- running commands
    def _run(self, argv: Sequence[str], check: bool = False,
             timeout: Optional[float] = None) -> CompletedCommand:
        """Run one Slurm command through the runner, in this backend's environment."""
        self.calls += 1
        try:
            return self.runner.run(argv, check=check, timeout=timeout or self.settings.command_timeout,
                                   env=self.env)
        except ToolNotFoundError as err:
            raise SchedulerError(f"Slurm is not available here: {err}") from err
        except CommandTimeoutError as err:
            if argv and argv[0] in ("sacct", "scontrol", "squeue"):
                raise TransientStatusError(str(err)) from err
            raise

    def max_array_size(self) -> int:
        """``MaxArraySize`` from ``scontrol show config`` (read once; Slurm's default 1001
        when it cannot be read)."""
        if self._max_array is None:
            try:
                res = self._run(cmd.show_config_argv(), check=True)
                self._max_array = cmd.parse_max_array_size(res.stdout)
            except (CommandError, UnexpectedOutputError) as err:
                logger.warning("cannot read MaxArraySize (%s); assuming Slurm's default 1001", err)
                self._max_array = 1001
        return self._max_array

    def version(self) -> Tuple[int, int]:
        res = self._run(cmd.version_argv(), check=True)
        return cmd.parse_slurm_version(res.stdout)

    # -------------------------------------------------------------- submit
    def submit_argv(self, script: str, args: Sequence[str] = (),
                    options: Sequence[str] = ()) -> List[str]:
        return cmd.sbatch_argv(script, args, options)

    def start_ahead(self) -> None:
        """Start the next ``sbatch`` ahead of its script (it reads it from stdin), so that the
        next :meth:`sbatch` of a script without extra arguments and options pays only the
        submission: ``sbatch``'s own start (configuration, libraries) is about 1.5 ms of its
        6 on the testbed. For a caller that submits again and again from one process (the
        Executor); a runner that cannot start commands ahead (a test's fake) leaves it, and
        so does any failure (the next submission runs ``sbatch`` as usual and says why), and
        ``submit_ahead = false`` in ``[slurm]``. :meth:`close_ahead` ends it unused."""
        start = getattr(self.runner, "start", None)
        if start is None or self._ahead_off or not self.settings.submit_ahead:
            return
        with self._ahead_lock:
            gone = self._ahead
            if gone is not None and gone.usable():
                return
            if gone is not None:
                # it ended before it was given a script (sbatch cannot start here, or was
                # killed): not started again by this backend, or a caller that starts one
                # after each pause would start a process every pause
                self._ahead, self._ahead_off = None, True
        if gone is not None:
            gone.discard()
            logger.debug("the sbatch started ahead ended by itself; not starting another")
            return
        try:
            ahead = start(cmd.sbatch_stdin_argv(), env=self.env, cwd=os.getcwd())
        except (OSError, NsdfError) as err:
            self._ahead_off = True    # not tried again (see above)
            logger.debug("cannot start sbatch ahead: %s", err)
            return
        with self._ahead_lock:
            old, self._ahead = self._ahead, ahead
        if old is not None:
            old.discard()

    def close_ahead(self) -> None:
        """End the ``sbatch`` started ahead, unused (it never read a script: no job)."""
        with self._ahead_lock:
            ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.discard()

    def _submit_ahead(self, script: str, timeout: float) -> Optional[CompletedCommand]:
        """Submit ``script`` through the ``sbatch`` started ahead; None when there is none, or
        it started in another directory or environment, or more than ``AHEAD_MAX_AGE`` s ago
        (it read the cluster's configuration then), or cannot take it (``Started.finish``)."""
        with self._ahead_lock:
            ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        try:
            here: Optional[str] = os.getcwd()
        except OSError:      # the working directory was removed: a plain sbatch says what it says
            here = None
        if (here is None or ahead.cwd != here or time.monotonic() - ahead.since > AHEAD_MAX_AGE
                or ahead.env != (dict(os.environ) if self.env is None else self.env)):
            ahead.discard()
            return None
        try:
            with open(script, "rb") as fh:
                data = fh.read()
        except OSError:
            ahead.discard()
            return None
        self.calls += 1
        res = ahead.finish(data, timeout)
        if res is None:
            self.calls -= 1
        return res

    def sbatch(self, script: str, args: Sequence[str] = (), options: Sequence[str] = ()) -> str:
        """Submit one script file; transient errors are retried with backoff. The first
        attempt goes through an ``sbatch`` started ahead when there is one (:meth:`start_ahead`)
        and no ``args`` or ``options`` are given."""
        backoff = Backoff(initial=1.0, factor=2.0, cap=30.0, jitter=0.3, clock=self._clock,
                          sleep=self._sleep, rng=self._rng)
        attempts = max(1, self.settings.submit_retries)
        last = ""
        for attempt in range(1, attempts + 1):
            try:
                res = None
                if attempt == 1 and not args and not options and self._ahead is not None:
                    res = self._submit_ahead(script, self.settings.command_timeout)
                if res is None:
                    res = self._run(cmd.sbatch_argv(script, args, options))
            except CommandTimeoutError as err:
                # the job may or may not exist: not retried blindly
                raise SubmitError(f"sbatch timed out; check `squeue` before submitting again: {err}",
                                  transient=True) from err
            if res.returncode == 0:
                return cmd.parse_submit(res.stdout)
            last = (res.stderr or res.stdout).strip()
            if not cmd.is_transient(last):
                raise SubmitError(f"sbatch refused the job: {last or f'exit status {res.returncode}'}")
            if attempt < attempts:
                logger.info("sbatch: %s (attempt %d/%d; retrying)", last, attempt, attempts)
                backoff.sleep()
        raise SubmitError(f"sbatch failed {attempts} times with a transient error: {last}",
                          transient=True)

    # -------------------------------------------------------------- status
    def status(self, job_ids: Sequence[str]) -> Dict[str, JobStatus]:
        """Statuses of every job in ONE scheduler call (array tasks keyed ``ID_TASK``)."""
        table, accounting = self.query_status(job_ids, self.accounting)
        if accounting == "none" and self.accounting != "none":
            self._accounting_disabled = True          # decided once; never goes back
        return table

    def query_status(self, job_ids: Sequence[str],
                     accounting: str) -> Tuple[Dict[str, JobStatus], str]:
        """The statuses, and the accounting mode that answered (``"none"`` when sacct said
        accounting is disabled; the caller records that decision)."""
        ids = list(dict.fromkeys(str(j) for j in job_ids))
        if not ids:
            return {}, accounting
        if accounting != "none":
            res = self._run(cmd.status_argv(ids))
            text = res.stderr + res.stdout
            if cmd.ACCOUNTING_DISABLED.lower() in text.lower():
                if accounting == "sacct":
                    raise SchedulerError(f"sacct: {cmd.ACCOUNTING_DISABLED} (set accounting to auto or none)")
                logger.info("sacct: %s; using scontrol and exit-code files", cmd.ACCOUNTING_DISABLED)
                return self._scontrol_status(ids, "none"), "none"
            if res.returncode != 0:
                msg = f"`sacct` failed: {res.stderr.strip() or res.returncode}"
                if cmd.is_transient(res.stderr):
                    return self._while_accounting_is_down(ids, accounting, msg), accounting
                raise SchedulerError(msg)
            table = self._with_oom_exit_codes(cmd.parse_sacct(res.stdout))
            partial = [k for k, v in table.items() if cmd.is_partial_record(v)]
            if partial:
                # slurmdbd catching up (seen after it was stopped: "FAILED 0:0", End Unknown,
                # for a job that exited 5, complete some seconds later): slurmctld's is right
                table.update(self._slurmctld_only(partial))
            present = {_base(k) for k in table} | set(table)
            missing = [j for j in ids if j not in present and not any(task_covered(j, k) for k in table)]
            if missing:
                # not in the database yet (submitted a moment ago, or held: slurmctld
                # records a job when it becomes eligible): slurmctld answers for them
                extra = self._scontrol_status(missing, accounting)
                for k, v in extra.items():
                    table.setdefault(k, v.model_copy(update={"accounting": True}))
            return table, accounting
        return self._scontrol_status(ids, accounting), accounting

    def _slurmctld_only(self, ids: Sequence[str]) -> Dict[str, JobStatus]:
        """What slurmctld says of these jobs, leaving out those it does not know (and all of
        them when it cannot be asked)."""
        res = self._run(cmd.scontrol_jobs_argv())
        if res.returncode != 0:
            return {}
        return {k: v.model_copy(update={"accounting": True})
                for k, v in self._with_oom_exit_codes(cmd.parse_scontrol_jobs(res.stdout)).items()
                if k in ids}

    def _while_accounting_is_down(self, ids: Sequence[str], accounting: str,
                                  msg: str) -> Dict[str, JobStatus]:
        """sacct failed in a way that passes (slurmdbd stopped or restarting): slurmctld and
        the exit-code files answer this round, and sacct is asked again the next. A job they
        do not know keeps the error (a transient one: ``wait`` polls on, never gives up)."""
        table = self._scontrol_status(ids, accounting)
        if any(st.source == "none" for st in table.values()):
            raise TransientStatusError(msg)
        logger.info("%s; slurmctld answers until accounting is back", msg)
        return {k: v.model_copy(update={"accounting": True}) for k, v in table.items()}

    def _scontrol_status(self, ids: Sequence[str], accounting: str) -> Dict[str, JobStatus]:
        res = self._run(cmd.scontrol_jobs_argv())
        if res.returncode != 0:
            msg = f"`scontrol show job` failed: {res.stderr.strip() or res.returncode}"
            if cmd.is_transient(res.stderr):
                raise TransientStatusError(msg)
            raise SchedulerError(msg)
        wanted = set(ids) | {_base(j) for j in ids}
        table = self._with_oom_exit_codes({k: v for k, v in cmd.parse_scontrol_jobs(res.stdout).items()
                                           if k in wanted or _base(k) in wanted})
        present = {_base(k) for k in table} | set(table)
        for j in ids:
            if j not in present:        # gone from slurmctld's memory (MinJobAge)
                table[j] = self._exit_file_status(j, accounting)
        return table

    def _exit_file_code(self, job_id: str) -> Optional[int]:
        """The exit status the job script left in its exit-code file (-1: unreadable), or
        None when there is no such file."""
        d = self.dirs.get(_base(job_id)) or self.find_dir(_base(job_id))
        path = os.path.join(d, "exit", job_id) if d else None
        if not path or not os.path.exists(path):
            return None
        try:
            with open(path) as fh:
                return int(fh.read().strip() or "-1")
        except (OSError, ValueError):
            return -1

    def _with_oom_exit_codes(self, table: Dict[str, JobStatus]) -> Dict[str, JobStatus]:
        """Slurm records an OOM-killed job as ``0:125`` whatever its script returned; the
        exit-code file keeps the command's own status (137 for the process the kernel killed)."""
        for k, st in table.items():
            if st.native_state.startswith("OUT_OF_MEMORY") and not st.exit_code:
                rc = self._exit_file_code(k)
                if rc is not None and rc > 0:
                    table[k] = st.model_copy(update={"exit_code": rc})
        return table

    def _exit_file_status(self, job_id: str, accounting: str) -> JobStatus:
        rc = self._exit_file_code(job_id)
        if rc is not None:
            state = JobState.COMPLETED if rc == 0 else JobState.FAILED
            return JobStatus(job_id=job_id, state=state, exit_code=rc, source="exit-code-file",
                             accounting=False,
                             reason="job no longer known to slurmctld; state from its exit-code file")
        why = ("not known to slurmctld (accounting disabled)" if accounting == "none"
               else "known neither to sacct nor to slurmctld")
        return JobStatus(job_id=job_id, state=JobState.UNKNOWN, source="none",
                         accounting=accounting != "none", reason=f"{why}, and no exit-code file")

    def find_dir(self, job_id: str) -> Optional[str]:
        """The job directory nsdf-hpc made for ``job_id`` (its ``by-id`` link), if any."""
        link = os.path.join(self.settings.work_dir, "by-id", _base(job_id))
        return os.path.realpath(link) if os.path.islink(link) else None

    # -------------------------------------------------------------- cancel
    def cancel_argv(self, job_ids: Sequence[str]) -> List[str]:
        return cmd.cancel_argv(job_ids)

    def cancel(self, job_ids: Sequence[str]) -> None:
        """One scancel for every id (``JOBID_TASK`` cancels only that array task)."""
        ids = list(dict.fromkeys(check_job_id(j) for j in job_ids))
        if not ids:
            return
        res = self._run(cmd.cancel_argv(ids))
        if res.returncode != 0 and "already completing or completed" not in res.stderr \
                and "Invalid job id" not in res.stderr:
            raise SchedulerError(f"scancel failed: {res.stderr.strip() or res.returncode}")

    # -------------------------------------------------------------- handles
    def attach(self, job_id: Union[str, int]) -> Job:
        """A handle on an existing job or array task (``1349`` or ``1349_10``), submitted by
        nsdf-hpc or not."""
        jid = check_job_id(job_id)
        base, _, task = jid.partition("_")
        d = self.dirs.get(base) or self.find_dir(base)
        prov = _read_json(os.path.join(d, "provenance.json")) if d else {}
        known = tuple(prov.get("job_ids") or ())
        ids = known if (base in known and not task) else (jid,)
        for i in ids:
            if d:
                self.dirs[_base(i)] = d
        foreign = not prov
        if task:
            # one task of an array: a plain job for status/logs/cancel, its log paths kept
            prov = {**prov, "array": False, "indices": [], "chunks": [], "task_of": base}
        return Job(self, ids, directory=d, provenance=prov, user=self.user,
                   paths=(lambda: self.paths_from_scontrol(jid)) if foreign else None)

    def paths_from_scontrol(self, job_id: str) -> Dict[str, Any]:
        """stdout/stderr paths of a job nsdf-hpc did not submit (while slurmctld knows it)."""
        try:
            res = self._run(cmd.scontrol_job_argv(job_id))
        except SchedulerError:
            return {}
        return dict(cmd.parse_job_paths(res.stdout))

    # -------------------------------------------------------------- waiting
    def wait_all(self, jobs: Sequence[Job], timeout: Optional[float] = None,
                 backoff: Optional[Backoff] = None) -> List[JobStatus]:
        """Wait for every job; each round is ONE status query (see :func:`.job.wait_all`;
        without ``backoff``, the schedule there starts from :meth:`backoff`)."""
        return wait_all(jobs, timeout=timeout, backoff=backoff)


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
