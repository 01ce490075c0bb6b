"""A process and its descendants, read from ``/proc`` (Linux): whether a container runtime
is still setting up, for the signal hold of the executor (``_exec._forward_signals``) and of
the launch-record path (``_launch``), and how much I/O it did (the stall watchdog of
``_exec``). Imports nothing but ``os``: it is on the start-up path.
"""
from __future__ import annotations

import os
# not `from typing import TYPE_CHECKING`: typing (with re and enum) costs about as much as
# the rest of the start-up path; type checkers treat this name as typing.TYPE_CHECKING
TYPE_CHECKING = False

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


def exists(pid: int) -> bool:
    """Whether ``pid`` is a process (a zombie too: it ended and was not reaped yet)."""
    return _comm(pid) is not None


def still_starting(pid: int, names: Sequence[str], started: Optional[str] = None) -> bool:
    """True while every process in ``pid``'s tree runs under one of the runtime's own
    ``names`` (``Runtime.startup_names``): the command has not been started yet. Where
    ``/proc`` says nothing, False (nothing is held).

    With ``started`` (``OrphanGuard.started``: a file the runtime writes with the
    container's process ID, for a container that is not in ``pid``'s tree), True while
    ``pid`` runs and that file is empty, or names a process that still runs under one of
    ``names``."""
    if started is not None:
        try:
            with open(started, encoding="ascii") as fh:
                text = fh.read().strip()
        except OSError:
            text = ""
        if not text.isdigit():
            return _comm(pid) is not None
        comm = _comm(int(text))
        return comm is not None and comm in names
    comms = [_comm(p) for p in _tree(pid)]
    return bool(comms) and comms[0] is not None and all(c is None or c in names for c in comms)


def innermost(pid: int) -> int:
    """The deepest process below ``pid`` that runs under ``pid``'s own name, following a
    chain of such children (rootless podman re-executes itself inside its user namespace:
    ``podman -> podman``); ``pid`` itself when there is none."""
    name = _comm(pid)
    while name is not None:
        child = None
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as fh:
                    child = next((int(c) for c in fh.read().split() if _comm(int(c)) == name), child)
        except (OSError, ValueError):
            pass
        if child is None:
            break
        pid = child
    return pid


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
