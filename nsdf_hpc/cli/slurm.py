"""``nsdf-run submit | status | cancel | logs``: the Slurm commands.

``submit`` prints the job id (one per ``sbatch`` call for a split array); ``--wait`` follows
the job and exits with its exit code, non-zero for every failed state (TIMEOUT,
OUT_OF_MEMORY, CANCELLED, ... even when the script's status was 0); ``--dry-run`` prints
the batch script and submits nothing. Job ids are ``N`` or an array task ``N_M``.
"""
from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple, cast

import click

from ..errors import SchedulerError

from ._common import (JOB_ID, Interrupted, cli_errors, container_command, exit_on_errors, make_client,
                      print_status, run_options, spec_options)

if TYPE_CHECKING:
    from ..client import Client
    from ..schedulers.job import Job
    from ..schedulers.submit import Prepared


def _slurm(ctx: click.Context, accounting: Optional[str] = None,
           work_dir: Optional[str] = None) -> Tuple["Client", Any]:
    """The client and its Slurm scheduler, with the command's overrides."""
    client = make_client(ctx)
    overrides = {k: v for k, v in (("accounting", accounting), ("work_dir", work_dir)) if v}
    return client, client.scheduler(**overrides)


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@run_options
@click.option("--nodes", "-N", type=int, help="sbatch --nodes")
@click.option("--ntasks", "-n", type=int, help="sbatch --ntasks (one container per task)")
@click.option("--ntasks-per-node", type=int, help="sbatch --ntasks-per-node")
@click.option("--cpus-per-task", "-c", type=int, help="sbatch --cpus-per-task")
@click.option("--mem", help="sbatch --mem (500M, 4G)")
@click.option("--gpus", "-G", help="sbatch --gpus")
@click.option("--time", "-t", "time_", help="sbatch --time (30, 1:00:00)")
@click.option("--partition", "-p", help="sbatch --partition")
@click.option("--account", "-A", help="sbatch --account")
@click.option("--qos", "-q", help="sbatch --qos")
@click.option("--constraint", "-C", help="sbatch --constraint")
@click.option("--exclusive", is_flag=True, help="sbatch --exclusive")
@click.option("--job-name", "-J", help="sbatch --job-name")
@click.option("--output", "-o", help="sbatch --output (patterns %j %A %a %x)")
@click.option("--error", help="sbatch --error")
@click.option("--array", "-a", help="sbatch --array (0-99, 1,3,5, 0-999%10); {index} in "
                                   "the command is replaced by the task index")
@click.option("--dependency", "-d", help="sbatch --dependency (afterok:ID[:ID],afterany:ID)")
@click.option("--mpi", type=click.Choice(["pmix", "pmi2", "none"]), help="srun --mpi per rank")
@click.option("--sbatch", "extra", multiple=True, metavar="OPTION",
              help="An extra #SBATCH option, e.g. --sbatch=--mail-type=END (repeatable).")
@click.option("--accounting", type=click.Choice(["auto", "sacct", "none"]),
              help="Where final states come from (default: auto).")
@click.option("--work-dir", metavar="DIR", help="Where scripts, logs and provenance go "
              "(a shared filesystem; default from [slurm] work_dir).")
@click.option("--wait", "wait_", is_flag=True, help="Follow the job; exit with its exit code.")
@click.option("--dry-run", is_flag=True, help="Print the batch script; submit nothing.")
@click.argument("image")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def submit(ctx: click.Context, image: str, command: Sequence[str], runtime: Optional[str],
           nodes: Optional[int], ntasks: Optional[int], ntasks_per_node: Optional[int],
           cpus_per_task: Optional[int], mem: Optional[str], gpus: Optional[str],
           time_: Optional[str], partition: Optional[str], account: Optional[str],
           qos: Optional[str], constraint: Optional[str], exclusive: bool,
           job_name: Optional[str], output: Optional[str], error: Optional[str],
           array: Optional[str], dependency: Optional[str], mpi: Optional[str],
           extra: Sequence[str], accounting: Optional[str], work_dir: Optional[str],
           wait_: bool, dry_run: bool, **options: Any) -> None:
    """Submit COMMAND in IMAGE as a Slurm batch job and print its id (`--` before COMMAND)."""
    with exit_on_errors(not_run=wait_, say_interrupted=False):
        argv = container_command(command, "submit")
        client, slurm = _slurm(ctx, accounting, work_dir)
        res: Dict[str, Any] = {k: v for k, v in dict(
            nodes=nodes, ntasks=ntasks, ntasks_per_node=ntasks_per_node,
            cpus_per_task=cpus_per_task, mem=mem, gpus=gpus, time=time_, partition=partition,
            account=account, qos=qos, constraint=constraint, job_name=job_name,
            output=output, error=error, mpi=mpi).items() if v is not None}
        if exclusive:
            res["exclusive"] = True
        if extra:
            res["extra_directives"] = tuple(extra)
        job_or_prep = client.submit(image, list(argv), runtime=runtime, scheduler=slurm,
                                    dry_run=dry_run, array=array, dependencies=dependency,
                                    **spec_options(**options), **res)
        if dry_run:
            prep = cast("Prepared", job_or_prep)
            click.echo(prep.script, nl=False)
            for chunk in prep.chunks[1:]:
                click.echo(f"# then: sbatch --parsable --array={chunk.array} SCRIPT {chunk.offset}")
            return
        job = cast("Job", job_or_prep)
        click.echo(",".join(job.job_ids))
        if not wait_:
            return
        try:
            st = job.wait()
        except (KeyboardInterrupt, Interrupted):
            # only the waiting stops: the job goes on in Slurm, so say how to stop it too
            ids = " ".join(job.job_ids)
            click.echo(f"nsdf-run: stopped waiting; Slurm job {ids} goes on "
                       f"(`nsdf-run cancel {ids}` ends it)", err=True)
            raise
        print_status(st, waited=True)
    sys.exit(st.shell_exit_code())


def _remember(client: "Client", slurm: Any) -> None:
    """The Slurm settings are valid and sacct answered: a later `status N` may answer without
    the settings models (``_status.py``). Best effort, after the output."""
    from .._status import remember_slurm
    from ..config import work_dir_follows_cwd
    from ..errors import NsdfError
    st = slurm.settings
    try:
        follows = work_dir_follows_cwd(st, client.env)
    except NsdfError:       # the config file changed meanwhile: nothing to remember
        return
    remember_slurm(client.env, st.work_dir, slurm.accounting, st.backend, slurm.backend,
                   st.command_timeout, follows)


@click.command()
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID)
@click.option("--json", "as_json", is_flag=True,
              help="A JSON array: one object per job (and per task with --tasks).")
@click.option("--accounting", type=click.Choice(["auto", "sacct", "none"]))
@click.option("--tasks", is_flag=True, help="Every array task, not only the summary.")
@click.pass_context
@cli_errors()
def status(ctx: click.Context, job_ids: Sequence[str], as_json: bool,
           accounting: Optional[str], tasks: bool) -> None:
    """Normalized state, Slurm's state and reason, and exit code of JOBID... (one query).

    JOBID is N or an array task N_M."""
    client, slurm = _slurm(ctx, accounting)
    jobs = [slurm.attach(j) for j in job_ids]
    table = slurm.status([i for j in jobs for i in j.job_ids])
    rows = []
    for j in jobs:
        rows.append(j._update(table))
        if tasks and len(j.tasks) > 1:
            rows.extend(j.tasks.values())
    if as_json:
        # which backend answered (commands, pyslurm, rest), beside each status
        click.echo(json.dumps([{**json.loads(r.model_dump_json()), "backend": slurm.backend}
                               for r in rows], indent=2))
    else:
        for r in rows:
            print_status(r)
    if accounting is None:
        _remember(client, slurm)


@click.command()
@click.argument("job_ids", nargs=-1, required=True, type=JOB_ID)
@click.pass_context
@cli_errors()
def cancel(ctx: click.Context, job_ids: Sequence[str]) -> None:
    """Cancel JOBID... (one scancel call); JOBID is N or an array task N_M."""
    _, slurm = _slurm(ctx)
    ids = [i for j in job_ids for i in slurm.attach(j).job_ids]
    slurm.cancel(ids)


@click.command()
@click.argument("job_id", type=JOB_ID)
@click.option("--stderr", "stream", flag_value="stderr", help="Show stderr.")
@click.option("--stdout", "stream", flag_value="stdout", default=True, help="Show stdout (default).")
@click.option("--tail", "-n", type=int, help="Only the last N lines.")
@click.option("--task", type=int, help="Array task index.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.pass_context
@cli_errors()
def logs(ctx: click.Context, job_id: str, stream: str, tail: Optional[int],
         task: Optional[int], follow: bool) -> None:
    """Print the stdout (or stderr) of JOBID (a job submitted by nsdf-run; N or N_M)."""
    _, slurm = _slurm(ctx)
    job = slurm.attach(job_id)
    if job.log_path(stream, task) is None:
        raise SchedulerError(f"job {job_id} was not submitted by nsdf-run here: no log path known "
                             f"(looked in {slurm.settings.work_dir}/by-id)")
    if not follow:
        click.echo(job.logs(stream, tail, task), nl=False)
        return
    for chunk in job.follow(stream, task):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
