"""Console-script entry point: answers ``--version`` before importing click and the library
(start-up time matters on login nodes and in job scripts that call nsdf-run per task)."""
from __future__ import annotations

import sys
# not `from typing import TYPE_CHECKING`: typing (with re and enum) costs about as much as
# the rest of the start-up path; type checkers treat this name as typing.TYPE_CHECKING
TYPE_CHECKING = False

if TYPE_CHECKING:
    from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> Optional[int]:
    """Returns the exit status when it has one (the console-script wrapper and ``__main__``
    exit with it); the click CLI exits by itself."""
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"]):
        from ._version import __version__
        sys.stdout.write(f"nsdf-run, version {__version__}\n")
        return None
    from ._launch import try_fast_run
    # returns None unless a valid launch record exists: then it execs, or for a runtime with
    # an orphan guard (podman) runs and waits, and returns the exit status
    status = try_fast_run(args)
    if status is not None:
        return status
    from .cli import main as cli_main
    cli_main(args)
    return None
