"""Submission: a spec -> a prepared job (script rendered, image pulled here) -> submitted.

Plain functions taking the :class:`~nsdf_hpc.client.Client` first: the client supplies the
runtime choice, the image and the exact runtime invocation; this module turns them into a
batch script and hands it to the backend (:class:`.slurm.Slurm`). The image is always
prepared on the submit host, never on the compute nodes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Union

from . import get_backend
from .._version import __version__
from ..config import SlurmSettings, load_slurm_settings
from ..environment import matches
from ..errors import ConfigError, SchedulerError, SpecError
from ..models import Bind, RunSpec, first_error
from .job import Job
from .script import (BIND_PROBE, CMD_SENTINEL, JOB_TIME_PATTERNS, ArrayChunk,
                     ScriptInputs, default_output, forwarding_templates, render_script, split_array)
from .slurm import Slurm
from .spec import ArraySpec, JobSpec, parse_dependencies

if TYPE_CHECKING:
    from ..cache import ImageCache
    from ..client import Client

__all__ = ["Prepared", "job_spec", "scheduler", "submit", "submit_array", "prepare",
           "submit_prepared", "sbatch_prepared", "record", "submit_pinned", "again", "new_job_dir", "check_work_dir"]

logger = logging.getLogger(__name__)


def job_spec(client: "Client", image: str, command: Optional[Sequence[str]] = None, *,
             binds: Sequence[Union[str, Bind]] = (),
             env: Union[None, Mapping[str, str], Sequence[str]] = None,
             commands: Optional[Sequence[Sequence[str]]] = None, array: Any = None,
             dependencies: Any = None, slurm: Optional[Slurm] = None, **options: Any) -> JobSpec:
    """A validated :class:`JobSpec` (run options + sbatch resources; ``[slurm]`` defaults)."""
    run_keys = set(RunSpec.model_fields) - {"image", "command", "binds", "env"}
    run_opts = {k: options.pop(k) for k in list(options) if k in run_keys}
    run = client.spec(image, list(command or (commands[0] if commands else ())), binds=binds, env=env,
                      **run_opts)
    array = _array_spec(array)
    if slurm is not None:
        for key in ("partition", "account"):
            if options.get(key) is None and getattr(slurm.settings, key):
                options[key] = getattr(slurm.settings, key)
        if slurm.settings.extra_directives:
            options["extra_directives"] = tuple(slurm.settings.extra_directives) + \
                tuple(options.get("extra_directives") or ())
    fields = {k: getattr(run, k) for k in type(run).model_fields}
    unknown = set(options) - set(JobSpec.model_fields)
    if unknown:
        raise SpecError(f"unknown job option(s): {', '.join(sorted(unknown))}")
    fields.update(options)
    try:
        return JobSpec(**fields, array=array,
                       commands=tuple(tuple(c) for c in commands) if commands is not None else None,
                       dependencies=parse_dependencies(dependencies))
    except ValueError as err:
        raise SpecError(f"invalid job: {first_error(err)}") from None


def _array_spec(array: Any) -> Optional[ArraySpec]:
    """An array given as sbatch's text (``"0-99%10"``), a count or indices."""
    if isinstance(array, str):
        return ArraySpec.parse(array)
    if isinstance(array, int):
        return ArraySpec(indices=tuple(range(array)))
    if array is not None and not isinstance(array, ArraySpec):
        return ArraySpec(indices=tuple(array))
    return array


def scheduler(client: "Client", **overrides: Any) -> Slurm:
    """The Slurm backend (pyslurm when it matches the cluster, else the commands); cached on
    the client unless ``overrides`` (``accounting``, ``work_dir``, ...) are given."""
    sched = client.__dict__.get("_slurm")
    if sched is None or overrides:
        sched = get_backend(client.runner, load_slurm_settings(client.env, **overrides), env=client.env)
        if not overrides:
            client.__dict__["_slurm"] = sched
    return sched


def submit(client: "Client", image: str, command: Optional[Sequence[str]] = None, *,
           runtime: Optional[str] = None, scheduler: Optional[Slurm] = None, dry_run: bool = False,
           **options: Any) -> Union[Job, "Prepared"]:
    """Submit ``command`` in ``image`` to Slurm; returns a :class:`Job`.

    The image is prepared here (never on the compute nodes). ``options`` are the run options
    of ``Client.run`` and the sbatch resources of :class:`JobSpec` (``nodes``, ``ntasks``,
    ``time``, ``array``, ``dependencies``, ``mpi``, ...). With ``dry_run=True`` nothing is
    pulled or submitted and the rendered script is returned (a :class:`Prepared`).
    """
    slurm = scheduler or client.scheduler()
    if not dry_run:
        check_work_dir(slurm.settings)      # before pulling an image: fail fast, one line
    spec = options.pop("spec", None) or job_spec(client, image, command, slurm=slurm, **options)
    prep = prepare(client, spec, slurm, runtime, dry_run=dry_run)
    if dry_run:
        return prep
    return submit_pinned(client, slurm, prep)


def submit_pinned(client: "Client", slurm: Slurm, prep: "Prepared") -> Job:
    """:func:`submit_prepared`, and the image's pin: a prune keeps the image while the job
    is queued or running."""
    job = sbatch_prepared(slurm, prep)
    record(slurm, job, client.cache)
    return job


def submit_array(client: "Client", image: str, commands: Optional[Sequence[Sequence[str]]] = None, *,
                 template: Optional[Sequence[str]] = None, indices: Any = None,
                 **options: Any) -> Union[Job, "Prepared"]:
    """An array job: one command per task (``commands``), or ``template`` with ``{index}``
    replaced by each task's index (``indices``: a count, ``"0-99%10"`` or a list)."""
    if (commands is None) == (template is None):
        raise SpecError("give either commands (one per task) or a template with {index}")
    if commands is not None:
        return submit(client, image, None, commands=commands, array=indices, **options)
    if indices is None:
        raise SpecError("an array template needs indices (a count, '0-99' or a list)")
    return submit(client, image, template, array=indices, **options)


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


def prepare(client: "Client", spec: JobSpec, slurm: Slurm, runtime: Any = None,
            dry_run: bool = False) -> Prepared:
    """Pull the image on this host, build the runtime invocation and render the script."""
    if "%" in slurm.settings.work_dir:
        raise SpecError(f"the Slurm work directory cannot contain '%': {slurm.settings.work_dir}")
    rt = client.runtime(runtime)
    # the job-time variables (SLURM_*, PMI*, ...) come from each task, not from this host
    static_env = {k: v for k, v in client.env.items() if not matches(k, JOB_TIME_PATTERNS)}
    cmd_spec = spec.run_spec(command=(CMD_SENTINEL,))
    if dry_run:
        inv, native, rt = client.plan(cmd_spec, rt, env=static_env)
    else:
        native = client.pull(spec.image, rt, platform=spec.platform)
        inv, native, rt = client.invocation(cmd_spec, rt, native, env=static_env)
    if not inv.argv or inv.argv[-1] != CMD_SENTINEL:
        raise SchedulerError(f"{rt.name}: the command is not at the end of the runtime argv")
    prefix = tuple(inv.argv[:-1])
    fwd_env, fwd_args, fwd_index = forwarding_templates(
        inv.encoding, len(inv.head) + len(inv.encoding.argv_words(inv.container_env)))
    # each rank binds its own PMIx server directory (as `nsdf-run run` under srun does)
    rank_bind = client.bind_template(cmd_spec, rt, native, inv, env=static_env, probe=BIND_PROBE) \
        if spec.mpi == "pmix" else None
    if spec.mpi == "pmix" and rank_bind is None:
        logger.info("%s: the job's ranks cannot bind their PMIx server directory with this image; "
                    "Open MPI falls back to PMIx's hash store", rt.name)
    if not dry_run:
        client.prepare(inv, rt)
    chdir = spec.cwd or os.getcwd()
    limit = 0
    if spec.array:
        try:
            limit = slurm.max_array_size()
        except SchedulerError:
            if not dry_run:
                raise
            limit = 1001
    # what the runtime will read when the job starts (a queued job may outlive a prune)
    store = rt.store_path(native.location, rt.runtime_env(client.env, client.cache.root))
    requires = tuple(p for p in (inv.tree[1] if inv.tree else None,
                                 native.location if os.path.isabs(native.location) else store)
                     if p)
    header = (f"generated by nsdf-hpc {__version__}: {spec.image} ({native.digest or 'no digest'})",
              f"runtime {rt.name} {rt.version or ''}: {native.location}")
    inputs = ScriptInputs(
        prefix=prefix, fixed_env=dict(inv.env), job_dir="", script_path="",
        chdir=chdir, fwd_env=fwd_env, fwd_args=fwd_args, fwd_index=fwd_index,
        forward=tuple(p for p in JOB_TIME_PATTERNS if p in client.settings.env_allow),
        deny=tuple(client.settings.env_deny), header=header, requires=requires, image=spec.image,
        use_lock=client.cache.use_path(native.runtime, native.digest) if native.digest and not dry_run else "",
        rank_bind=rank_bind[0] if rank_bind else (), rank_mkdirs=rank_bind[1] if rank_bind else ())
    provenance = {
        "nsdf_hpc": __version__, "image": spec.image, "digest": native.digest,
        "native": native.location, "runtime": rt.name, "runtime_version": rt.version,
        "argv": list(prefix), "job_name": spec.job_name, "accounting": slurm.accounting,
    }
    return _in_job_dir(spec, inputs, provenance, slurm.settings.work_dir, limit)


def _in_job_dir(spec: JobSpec, inputs: ScriptInputs, provenance: Dict[str, Any], work_dir: str,
                max_array_size: int) -> Prepared:
    """The job in a new directory under ``work_dir``: its paths, chunks, script and
    provenance (``inputs.header`` without the provenance line)."""
    job_dir = new_job_dir(work_dir, spec.job_name)
    script_path = os.path.join(job_dir, "job.sh")
    out = spec.output or default_output(spec, job_dir, "out")
    err = spec.error or default_output(spec, job_dir, "err")
    chunks = split_array(spec.array, max_array_size) if spec.array else []
    inputs = replace(inputs, job_dir=job_dir, script_path=script_path, output=out, error=err,
                     header=(*inputs.header, f"provenance: {os.path.join(job_dir, 'provenance.json')}"),
                     array_indices=spec.array.indices if spec.array else (),
                     remapped=bool(chunks and chunks[0].offset is not None))
    # one script for every chunk: the chunk's offset is the script's first argument
    script = render_script(spec, inputs, chunks[0].array if chunks else None)
    provenance = {
        **provenance, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(spec.command) if spec.commands is None else [list(c) for c in spec.commands],
        "script": script_path, "script_sha256": hashlib.sha256(script.encode("utf-8", "surrogateescape")).hexdigest(),
        "output": out, "error": err, "directory": job_dir, "array": bool(spec.array),
        "indices": list(spec.array.indices) if spec.array else [], "job_ids": [], "chunks": [],
    }
    return Prepared(spec, inputs, chunks, script, provenance)


def again(prep: Prepared, slurm: Slurm, *, command: Optional[Sequence[str]] = None,
          array: Any = None) -> Prepared:
    """``prep`` as a new job: the same image, runtime invocation and resources, in a new job
    directory, with ``command`` and ``array`` (a count or indices; the ``%throttle`` stays)
    when given. Nothing is pulled or planned again, so this is for many jobs of one kind (the
    Executor's calls): the caller decides that ``prep`` still holds (its image is there:
    ``prep.inputs.requires``)."""
    update: Dict[str, Any] = {}
    if command is not None:
        if prep.spec.commands is not None:
            raise SpecError("this job has one command per task; give its array again instead")
        update["command"] = tuple(command)
    if array is not None:
        if prep.spec.commands is not None or not prep.spec.array:
            raise SpecError("only an array job with a template can be given new indices")
        new = _array_spec(array)
        assert new is not None
        throttle = new.throttle or prep.spec.array.throttle    # kept unless given anew
        update["array"] = new.model_copy(update={"throttle": throttle})
    spec = prep.spec.model_copy(update=update) if update else prep.spec
    inputs = replace(prep.inputs, header=prep.inputs.header[:-1])   # its provenance line goes
    return _in_job_dir(spec, inputs, prep.provenance, slurm.settings.work_dir,
                       slurm.max_array_size() if spec.array else 0)


def check_work_dir(settings: SlurmSettings) -> None:
    """A ConfigError naming the setting (NSDF_HPC_SLURM_DIR, a file, an argument) when the
    work directory is a file or cannot be written, instead of an OSError traceback later."""
    path = settings.work_dir
    where = settings.source("work_dir")
    what = f"{where}={path}" if where.startswith("NSDF_HPC_") else f"Slurm work_dir {path} (from {where})"
    probe = path
    while not os.path.exists(probe):        # the nearest existing parent decides
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"{what}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {probe} is not writable by this user")


def submit_prepared(slurm: Slurm, prep: Prepared) -> Job:
    """Write the script, one sbatch per array chunk, then the job's record (:func:`record`)."""
    job = sbatch_prepared(slurm, prep)
    record(slurm, job)
    return job


def sbatch_prepared(slurm: Slurm, prep: Prepared) -> Job:
    """Write the script and submit it, one sbatch per array chunk. The job's record on disk
    (:func:`record`) is the caller's to write, right after or off the submission's path."""
    check_work_dir(slurm.settings)
    job_dir = prep.inputs.job_dir
    try:
        os.makedirs(job_dir, exist_ok=True)   # exit/ is the script's to make (Job.exit_files_done)
        fd = os.open(prep.inputs.script_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755)
        with open(fd, "w", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write(prep.script)
    except OSError as err:
        # a race, a full disk, a read-only mount: still one line naming the setting, and no
        # half-written job directory left behind (nothing was submitted)
        shutil.rmtree(job_dir, ignore_errors=True)
        raise ConfigError(f"cannot write the job directory {job_dir} "
                          f"(work_dir from {slurm.settings.source('work_dir')}): "
                          f"{err.strerror or err}") from err
    prov = prep.provenance
    ids: List[str] = []
    chunks: List[Optional[ArrayChunk]] = list(prep.chunks) or [None]
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
    prov["job_ids"] = ids
    return Job(slurm, ids, directory=job_dir, provenance=prov, script=prep.inputs.script_path,
               user=slurm.user)


def record(slurm: Slurm, job: Job, cache: Optional["ImageCache"] = None) -> None:
    """What other processes find a submitted job by: ``by-id/JOBID`` links to its directory
    (``nsdf-run status``, ``logs``) and ``provenance.json``; with ``cache``, the image's pin
    (a prune keeps the image while the job is queued or running). The job is submitted
    already, so a failure here is a warning, never an error (one would invite a resubmit)."""
    assert job.directory is not None
    by_id = os.path.join(slurm.settings.work_dir, "by-id")
    for jid in job.job_ids:
        _link(job.directory, by_id, jid)
    path = os.path.join(job.directory, "provenance.json")
    try:
        with open(path, "w") as fh:
            fh.write(provenance_text(job.provenance))
    except OSError as err:
        logger.warning("job %s is submitted, but its provenance cannot be written to %s (%s)",
                       job.job_id, path, err.strerror or err)
    digest = job.provenance.get("digest")
    if cache is not None and digest:
        cache.pin(str(job.provenance["runtime"]), str(digest), job.job_ids)


def _link(job_dir: str, by_id: str, job_id: str) -> None:
    """``by_id/JOBID`` -> the job directory (``nsdf-run status`` and ``logs`` find jobs by
    id there); ``by_id`` is made when missing, not checked before every link."""
    link = os.path.join(by_id, job_id)
    try:
        try:
            os.symlink(job_dir, link)
        except FileExistsError:         # an id Slurm gave before (a cluster reset)
            os.unlink(link)
            os.symlink(job_dir, link)
        except FileNotFoundError:       # the first job in this work directory
            os.makedirs(by_id, exist_ok=True)
            os.symlink(job_dir, link)
    except OSError as err:
        logger.debug("cannot link %s: %s", link, err)


def provenance_text(prov: Mapping[str, Any]) -> str:
    """The provenance record as JSON, one key per line (each value by the C encoder: an
    indented ``json.dumps`` takes the pure-Python one, about 0.2 ms per job)."""
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in prov.items())
    return "{\n" + lines + "\n}\n"
