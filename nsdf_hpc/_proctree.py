"""A process and its descendants, read from ``/proc`` (Linux): whether a container runtime
is still setting up, for the signal hold of the executor (``_exec._forward_signals``) and of
the launch-record path (``_launch``), and how much I/O it did (the stall watchdog of
``_exec``). Imports nothing but ``os``: it is on the start-up path.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import List, Optional, Sequence

#: the longest a signal is held for a runtime still setting up (then it is passed on anyway)
HOLD_LIMIT = 10.0


def _tree(pid: int) -> List[int]:
    """``pid`` and its descendants (Linux ``/proc/PID/task/TID/children``)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children", encoding="ascii") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            pass
    return found


def _comm(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as fh:
            return fh.read().strip()
    except OSError:
        return None


def still_starting(pid: int, names: Sequence[str]) -> bool:
    """True while every process in ``pid``'s tree runs under one of the runtime's own
    ``names`` (``Runtime.startup_names``): the command has not been started yet. Where
    ``/proc`` says nothing, False (nothing is held)."""
    comms = [_comm(p) for p in _tree(pid)]
    return bool(comms) and comms[0] is not None and all(c is None or c in names for c in comms)


def tree_io(pid: int) -> Optional[int]:
    """Bytes read and written so far by ``pid`` and its descendants (``rchar + wchar`` of
    ``/proc/PID/io``, sockets included); None when ``/proc`` cannot tell (then nothing is
    judged stalled)."""
    total = 0
    seen = False
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/io", encoding="ascii") as fh:
                fields = dict(line.split(":", 1) for line in fh.read().splitlines() if ":" in line)
            total += int(fields["rchar"]) + int(fields["wchar"])
            seen = True
        except (OSError, KeyError, ValueError):
            continue
    return total if seen else None
