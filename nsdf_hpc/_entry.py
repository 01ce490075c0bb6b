"""Console-script entry point: answers ``--version`` before importing click and the library
(start-up time matters on login nodes and in job scripts that call nsdf-run per task)."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args in (["--version"], ["-V"]):
        from ._version import __version__
        sys.stdout.write(f"nsdf-run, version {__version__}\n")
        return
    from ._launch import try_fast_run
    try_fast_run(args)   # returns unless a valid launch record exists (then it execs)
    from .cli import main as cli_main
    cli_main(args)
