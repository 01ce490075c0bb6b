"""``nsdf-run``, the command line: the click group, its global options, and :func:`main`.

The only part of nsdf_hpc that prints or exits. Each group of commands lives in its own module
(``run``, ``images``, ``runtimes``, ``slurm``, ``build``), which imports only :mod:`._common` (errors ->
exit codes, shared options, the client) and never another command module; this module adds
their commands to the group. ``nsdf_hpc._entry`` answers ``--version`` and replays recorded
launches before importing this package.
"""
from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

if TYPE_CHECKING:
    from typing import NoReturn

import click

from .. import _exec
from .._version import __version__
from . import build, images, runtimes, slurm
from . import run as _run
from ._common import Interrupted as _Interrupted


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="nsdf-run")
@click.option("-v", "--verbose", count=True, help="Log what nsdf-run does (-vv: every command).")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Run Docker/OCI images on HPC clusters with Apptainer, Charliecloud, Shifter,
    Podman or UDocker, whichever this machine offers."""
    ctx.ensure_object(dict)["quiet"] = quiet
    if verbose:
        import logging
        logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.INFO,
                            format="nsdf-run: %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


for _command in (_run.run, images.pull, runtimes.runtimes, runtimes.doctor, images.images,
                 images.prune, slurm.submit, slurm.status, slurm.cancel, slurm.logs,
                 build.build, build.push, build.recipe):
    cli.add_command(_command)


#: signals taken by :func:`_interrupt`, first first: a library that catches every exception
#: (pydantic building a schema on first use wraps it in SchemaError) or one of our own
#: ``except BaseException`` cleanups may turn the Interrupted into another error, but the run
#: still ends as the signal asked
_received: List[int] = []


def _interrupt(signum: int, frame: Any) -> None:
    _received.append(signum)
    _exec.received.append(signum)   # a streamed run refuses to start after it (``_exec.received``)
    raise _Interrupted(signum)


def _exit_interrupted(signum: int) -> "NoReturn":
    sys.stderr.write(f"\nnsdf-run: interrupted by {signal.Signals(signum).name}\n")
    sys.exit(128 + signum)


def main(argv: Optional[List[str]] = None, interrupted: Sequence[int] = ()) -> None:
    """Entry point of the ``nsdf-run`` console script and ``python -m nsdf_hpc``.

    A signal to nsdf-run ends it with 128+N, as a shell reports it, after cleaning up; while a
    container runs, the executor passes the signal on to it instead (``_exec.py``).
    ``interrupted``: signals noted before these handlers (``_entry.interrupted``), whose
    KeyboardInterrupt Python passed over (in a finalizer): the command ends at once."""
    args = sys.argv[1:] if argv is None else list(argv)
    _received.clear()
    _exec.received.clear()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)
    if interrupted:
        _exit_interrupted(interrupted[0])
    try:
        cli.main(args=args, prog_name="nsdf-run", obj={"argv": args})
    except _Interrupted as stop:
        _exit_interrupted(stop.signum)
    except BaseException as err:
        # an Interrupted that some code turned into another exception or an exit status
        if _received and not (isinstance(err, SystemExit) and err.code == 128 + _received[0]):
            _exit_interrupted(_received[0])
        raise


__all__ = ["cli", "main"]
