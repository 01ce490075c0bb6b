"""Console-script entry point: answers ``--version`` before importing click and the library
(start-up time matters on login nodes and in job scripts that call nsdf-run per task)."""
from __future__ import annotations

import os
import sys
# not `from typing import TYPE_CHECKING`: typing (with re and enum) costs about as much as
# the rest of the start-up path; type checkers treat this name as typing.TYPE_CHECKING
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import Any, List, Optional, Tuple

#: SIGINTs taken by ``_note_sigint`` before the CLI's own handlers (``cli.main``) or the
#: launch record's start (``_launch.try_fast_run``): both start nothing once one is here
interrupted: List[int] = []


def _note_sigint(signum: int, frame: Any) -> None:
    """Python's own SIGINT handler, that also notes the signal: a KeyboardInterrupt raised
    while Python runs a finalizer or a weakref callback (the import system's module locks)
    is printed ("Exception ignored in") and the program goes on, as if never interrupted."""
    interrupted.append(signum)
    raise KeyboardInterrupt


def _take_sigint() -> Any:
    """Install ``_note_sigint`` in place of Python's default SIGINT handler; returns what
    puts the previous one back, or None when it left it alone (ignored, as in a background
    job of a script, or another thread)."""
    try:
        import _signal   # type: ignore[import-not-found, unused-ignore]   # noqa: PLC0415 (signal imports enum)
    except ImportError:   # pragma: no cover - not CPython
        import signal as _signal   # noqa: PLC0415
    try:
        if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
            previous = _signal.signal(_signal.SIGINT, _note_sigint)
            return lambda: _signal.signal(_signal.SIGINT, previous)
    except ValueError:   # not the main thread
        pass
    return None


def main(argv: Optional[List[str]] = None) -> Optional[int]:
    """Returns the exit status when it has one (the console-script wrapper and ``__main__``
    exit with it); the click CLI exits by itself.

    A Ctrl-C before the CLI installs its handlers (while a launch record is read, or click
    and pydantic are imported: nothing was started yet) ends it as the CLI would, with 130
    and one line, not a traceback and 1.

    So does one that came while the interpreter started, where CPython prints the
    KeyboardInterrupt and goes on (while it checks whether the script's path is an import
    path entry: "Failed checking if argv[0] is an import path entry"; it keeps the exception
    in ``sys.last_value``): nsdf-run would otherwise run the container as if never told to
    stop (measured: 2 SIGINTs in 400 sent to a script's interpreter in its first 15 ms)."""
    if argv is None and isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
        sys.stderr.write("nsdf-run: interrupted by SIGINT\n")
        return 130
    del interrupted[:]
    restore = _take_sigint()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        sys.stderr.write("\nnsdf-run: interrupted by SIGINT\n")
        return 130
    finally:
        if restore is not None:
            restore()


def _main(argv: Optional[List[str]]) -> Optional[int]:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"]):
        from ._version import __version__
        sys.stdout.write(f"nsdf-run, version {__version__}\n")
        return None
    fast = not os.environ.get("NSDF_HPC_NO_FAST_PATH")
    if fast and args and args[0] == "run":
        from ._launch import try_fast_run   # noqa: PLC0415
        # returns None unless a valid launch record exists: then it execs, or for a runtime
        # with an orphan guard (podman) runs and waits, and returns the exit status
        status = try_fast_run(args, interrupted)
        if status is not None:
            return status
    elif fast and args and args[0] == "images":
        # a bare listing, from the cache's files without the settings models (``_listing.py``)
        from ._listing import fast_images   # noqa: PLC0415
        out = fast_images(args, os.environ)   # a Ctrl-C on a slow shared filesystem: see main
        if out is not None:
            return _write(out)
    elif fast and args and args[0] == "runtimes":
        # the kept answer, while everything it was made from holds (``_runtimes_answer.py``)
        from ._runtimes_answer import fast_runtimes   # noqa: PLC0415
        out = fast_runtimes(args, os.environ)
        if out is not None:
            return _write(out)
    elif fast and args and args[0] == "status":
        # bare job ids: one sacct call, printed without the settings models (``_status.py``)
        from ._status import fast_status   # noqa: PLC0415
        out = fast_status(args, os.environ, interrupted)
        if out is not None:
            return _write(out)
    _without_pydantic_plugins()
    from .cli import main as cli_main
    cli_main(args, interrupted)
    return None


_PYDANTIC_LOADER = "pydantic.plugin._loader"


def _without_pydantic_plugins() -> None:
    """nsdf-run's own process loads no pydantic plugins (the ``pydantic`` entry-point group:
    observability hooks on validation). pydantic looks for them when it builds the first
    validator, through ``importlib.metadata`` (with ``zipfile``, ``csv`` and a scan of every
    installed distribution): 1.0 MB of a cold run's peak memory, for hooks that nsdf-run's
    own settings and records never need. A library user's process (``import nsdf_hpc``) is
    left alone: their plugins see our models as before.

    It answers pydantic's one question (``get_plugins``) with "none"; any other name pydantic
    may ask that module for (a newer pydantic) gets the real module, loaded then."""
    if _PYDANTIC_LOADER in sys.modules:   # loaded already (a site hook): nothing to save
        return
    stub = type(sys)(_PYDANTIC_LOADER, "nsdf-run: no pydantic plugins (see nsdf_hpc._entry)")

    def get_plugins() -> Tuple[()]:
        return ()

    def real(name: str) -> Any:
        if name.startswith("__"):   # the import system's own questions (``__path__``)
            raise AttributeError(name)
        if sys.modules.get(_PYDANTIC_LOADER) is stub:
            del sys.modules[_PYDANTIC_LOADER]
        import importlib   # noqa: PLC0415
        return getattr(importlib.import_module(_PYDANTIC_LOADER), name)

    vars(stub).update(get_plugins=get_plugins, __getattr__=real)   # __getattr__: PEP 562
    sys.modules[_PYDANTIC_LOADER] = stub


def _write(text: str) -> int:
    """Standard output as the click commands leave it: a reader that went away (``| head``)
    ends the command quietly with status 1, as click does on EPIPE."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 1
    return 0
