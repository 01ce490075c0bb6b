"""What every ``nsdf-run`` command shares, written once: library errors -> exit codes, Ctrl-C ->
130, the ``IMAGE -- COMMAND`` handling, the run options, client construction, option types
(sizes, ages, job ids) and the one-line job status.

Exit codes: a command run in a container passes its own status through; 125 means nothing
ran because nsdf-run or the runtime failed first (podman/docker convention); 2 is bad input
(malformed --bind/--env/image reference, unknown runtime, bad option values); 1 is any other
error; 130 is Ctrl-C.

The library (pydantic, the client) and rich are imported inside the functions that need them,
on purpose: `nsdf-run --help`, `--version` and usage errors answer without those imports
(start-up on login nodes and in job scripts). These are the package's only function-level
imports besides the fast paths (``_entry.py``, ``_launch.py``, ``_listing.py``, ``_status.py``)
and optional or version-dependent modules (pyslurm, tomli, ssl, pwd).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import sys
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, NoReturn, Optional, Sequence,
                    Tuple, TypeVar, cast)

import click

if TYPE_CHECKING:
    from ..client import Client
    from ..errors import NsdfError

F = TypeVar("F", bound=Callable[..., Any])
EXIT_NOT_RUN = 125
EXIT_INTERRUPTED = 130


# -- errors and exit codes ------------------------------------------------------------------

def error_exit(err: "NsdfError", not_run: bool = False) -> NoReturn:
    """Print ``err`` as one line on stderr and exit: 2 for bad input, 125 when nothing ran
    (``not_run``), else the error's own exit code (1 by default)."""
    from ..errors import ConfigError, SpecError
    click.echo(f"nsdf-run: error: {err}", err=True)
    if isinstance(err, (SpecError, ConfigError)):
        sys.exit(2)
    sys.exit(EXIT_NOT_RUN if not_run else getattr(err, "exit_code", 1))


class Interrupted(BaseException):
    """SIGINT/SIGTERM/SIGHUP while nsdf-run itself works (planning, pulling, waiting): unwinds
    like KeyboardInterrupt, so every ``finally`` removes its temporary files and kills its
    child processes, but is not caught by click (whose "Aborted!" exits 1). Raised by the
    handler that ``cli.main`` installs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def exit_on_errors(not_run: bool = False, say_interrupted: bool = True) -> Iterator[None]:
    """Inside the block, an NsdfError becomes one line and an exit code (:func:`error_exit`)
    and Ctrl-C exits 130 (announced unless a container's own output already showed it)."""
    from ..errors import NsdfError
    try:
        yield
    except NsdfError as err:
        error_exit(err, not_run)
    except KeyboardInterrupt:
        if say_interrupted:
            click.echo("nsdf-run: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def cli_errors(not_run: bool = False) -> Callable[[F], F]:
    """Decorator form of :func:`exit_on_errors` for a whole command."""
    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with exit_on_errors(not_run):
                return fn(*args, **kwargs)
        return cast(F, wrapper)
    return deco


def container_command(command: Sequence[str], verb: str) -> Tuple[str, ...]:
    """COMMAND after IMAGE, without the leading ``--``; a usage error (exit 2) when empty."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise click.UsageError(f"missing COMMAND after IMAGE (nsdf-run {verb} IMAGE -- CMD...)")
    return tuple(command)


# -- the client and its progress output -----------------------------------------------------

def make_client(ctx: click.Context, json_events: bool = False) -> "Client":
    """A Client whose progress goes to stderr: JSON events, a terminal bar, or nothing."""
    from ..client import Client
    obj: Dict[str, Any] = ctx.ensure_object(dict)
    return Client(progress=progress_printer(json_events, obj.get("quiet", False)))


def progress_printer(json_events: bool, quiet: bool) -> Callable[[Dict[str, Any]], None]:
    """The progress sink for this invocation (rich is imported only for a terminal)."""
    if json_events:
        def emit(event: Dict[str, Any]) -> None:
            click.echo(json.dumps(event), err=True)
        return emit
    if quiet or not sys.stderr.isatty():
        return lambda event: None
    from .progress import TerminalProgress
    return TerminalProgress()


# -- options shared by run and submit -------------------------------------------------------

def run_options(fn: F) -> F:
    """The container options of ``run`` and ``submit`` (see :func:`spec_options`)."""
    opts = [
        click.option("--runtime", "-r", metavar="NAME", help="Use this runtime (never falls back)."),
        click.option("--bind", "-B", "binds", multiple=True, metavar="SRC[:DST[:ro]]",
                     help="Make a host path visible in the container (repeatable)."),
        click.option("--env", "-e", "envs", multiple=True, metavar="NAME=VALUE",
                     help="Set a variable in the container (repeatable)."),
        click.option("--workdir", "-w", metavar="DIR", help="Working directory in the container."),
        click.option("--gpu", is_flag=True, help="Make the host's GPUs available."),
        click.option("--no-network", is_flag=True, help="Run without network access."),
        click.option("--writable-tmpfs", is_flag=True, help="A writable, temporary overlay."),
        click.option("--fakeroot", is_flag=True, help="Run as (fake) root in the container."),
        click.option("--no-bind-cwd", is_flag=True,
                     help="Do not bind the current directory or start in it."),
        click.option("--runtime-arg", "runtime_args", multiple=True, metavar="ARG",
                     help="Pass ARG to the runtime verbatim (repeatable; escape hatch)."),
        click.option("--platform", metavar="OS/ARCH",
                     help="Prepare the image for this platform (linux/arm64), not this host's: "
                          "for nodes of that architecture."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def spec_options(binds: Sequence[str], envs: Sequence[str], workdir: Optional[str], gpu: bool,
                 no_network: bool, writable_tmpfs: bool, fakeroot: bool, no_bind_cwd: bool,
                 runtime_args: Sequence[str], platform: Optional[str] = None) -> Dict[str, Any]:
    """The values of :func:`run_options` (but --runtime) as ``Client.spec`` keywords."""
    return dict(binds=list(binds), env=list(envs), workdir=workdir, gpu=gpu, network=not no_network,
                writable_tmpfs=writable_tmpfs, fakeroot=fakeroot, bind_cwd=not no_bind_cwd,
                extra_args=tuple(runtime_args), platform=platform)


# -- option types: bad values are click usage errors (exit 2) -------------------------------

_MAX_SIZE = (1 << 63) - 1


class SizeType(click.ParamType):
    """A size in bytes: ``10G``, ``500M``, ``1.5T``, ``4096``; ``0`` is allowed (meaning
    "nothing"); negative, non-finite and absurdly large values are rejected."""
    name = "size"
    _UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        if isinstance(value, int):
            return value
        text = str(value)
        t = text.strip().upper().rstrip("B").rstrip("I")
        try:
            number = float(t[:-1]) * self._UNITS[t[-1]] if t and t[-1] in self._UNITS else int(t)
        except (ValueError, IndexError):
            self.fail(f"invalid size {text!r}: use e.g. 10G, 500M", param, ctx)
        if not math.isfinite(number) or number < 0 or number > _MAX_SIZE:
            self.fail(f"invalid size {text!r}: must be zero or more and at most 8 EiB", param, ctx)
        return int(number)


class AgeType(click.ParamType):
    """An age in seconds: ``30d``, ``12h``, ``90m``, ``2w``, ``45s`` or plain seconds; ``0`` is
    allowed (every entry is old enough); negative and non-finite values are rejected."""
    name = "age"
    _UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
            text = str(value)
        else:
            text = str(value)
            try:
                number = (float(text[:-1]) * self._UNITS[text[-1]] if text[-1] in self._UNITS
                          else float(text))
            except (ValueError, IndexError):
                self.fail(f"invalid age {text!r}: use e.g. 30d, 12h, 90m", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"invalid age {text!r}: must be zero or more, e.g. 30d, 12h, 90m", param, ctx)
        return number


class JobIdType(click.ParamType):
    """A Slurm job id: ``N`` or an array task ``N_M`` (as squeue and sacct print them)."""
    name = "jobid"
    _PATTERN = re.compile(r"\d+(_\d+)?")

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> str:
        text = str(value).strip()
        if not self._PATTERN.fullmatch(text):
            self.fail(f"invalid job id {value!r}: expected N or N_M (an array task)", param, ctx)
        return text


SIZE = SizeType()
AGE = AgeType()
JOB_ID = JobIdType()


# -- job status -----------------------------------------------------------------------------

def print_status(st: Any, waited: bool = False) -> None:
    """One line per job status: the ``status`` table row on stdout (tab-separated, with signal
    and accounting: :func:`nsdf_hpc._slurm_text.status_row`), or, for ``submit --wait``
    (``waited``), the final state on stderr."""
    if waited:
        code = "" if st.exit_code is None else f" exit={st.exit_code}"
        why = f" ({st.reason})" if st.reason else ""
        click.echo(f"{st.job_id} {st.state.value} {st.native_state}{code}{why}", err=True)
        return
    from .._slurm_text import status_row
    click.echo(status_row(st.job_id, st.state, st.native_state, st.exit_code, st.signal, st.reason,
                          st.accounting))
