"""Captured runs end their whole process tree on an exception (Ctrl-C's KeyboardInterrupt),
and a guarded one removes its container then: the executor's captured run and the launch
record's (``_launch._spawn_capture``), on real processes of the host."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import List

import pytest

from nsdf_hpc._exec import CompletedCommand, run_guarded


#: a Python child that runs a shell whose command runs in the shell's child (as UDocker's relay
#: runs the container), captured, and is interrupted after ``DELAY`` s; prints the grandchild
CAPTURED = {
    "record": "from nsdf_hpc import _launch\nrun = lambda: _launch._spawn_capture(ARGV, dict(os.environ))\n",
    "executor": ("from nsdf_hpc._exec import SubprocessRunner\n"
                 "run = lambda: SubprocessRunner().run(ARGV, check=False, capture=True)\n"),
}


def _running_sleep(pid: int) -> bool:
    """Whether ``pid`` is still our ``sleep`` and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return "(sleep)" in stat and stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("path", sorted(CAPTURED))
def test_keyboard_interrupt_ends_the_captured_runs_whole_tree(path: str, tmp_path) -> None:
    """Found by hand: ``nsdf_hpc.run()`` interrupted by SIGINT to Python alone left UDocker's
    container running (only udocker, the program started, was killed). Tested at several
    points of the run, 12 times."""
    left: List[str] = []
    for trial in range(12):
        pidfile = tmp_path / f"pid{trial}"
        argv = ["/bin/sh", "-c", f"sleep 300 & echo $! > {pidfile}; wait"]
        code = (f"import os, signal, sys, time\nARGV = {argv!r}\n" + CAPTURED[path] +
                "signal.setitimer(signal.ITIMER_REAL, DELAY)\n"
                "signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))\n"
                "try:\n    run()\nexcept KeyboardInterrupt:\n    print('interrupted', flush=True)\n")
        delay = 0.2 + 0.1 * (trial % 4)
        out = subprocess.run([sys.executable, "-c", code.replace("DELAY", repr(delay))], capture_output=True,
                             text=True, timeout=60)
        assert out.stdout.strip() == "interrupted", out.stderr
        if not pidfile.exists():
            continue   # interrupted before the shell started its child: nothing to leave
        pid = int(pidfile.read_text())
        deadline = time.monotonic() + 5
        while _running_sleep(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _running_sleep(pid):
            left.append(f"trial {trial} at {delay} s: {pid}")
            os.kill(pid, signal.SIGKILL)
    assert not left


class _Interrupted:
    """A runner whose run of the runtime is interrupted; what else it runs is noted."""

    def __init__(self) -> None:
        self.calls: List[List[str]] = []

    def run(self, argv, **kw) -> CompletedCommand:   # type: ignore[no-untyped-def]
        self.calls.append(list(argv))
        if len(self.calls) == 1:
            raise KeyboardInterrupt
        return CompletedCommand(tuple(argv), 0, "nsdf-1-ab\n", "", 0.0, None)


def test_an_exception_in_a_guarded_run_removes_its_container_then_goes_on() -> None:
    runner = _Interrupted()
    with pytest.raises(KeyboardInterrupt):
        run_guarded(runner, ["podman", "run", "x"], env=None, capture=True, remove=["podman", "rm", "-f", "nsdf-1-ab"])
    assert runner.calls == [["podman", "run", "x"], ["podman", "rm", "-f", "nsdf-1-ab"]]
    unguarded = _Interrupted()
    with pytest.raises(KeyboardInterrupt):
        run_guarded(unguarded, ["ch-run", "x"], env=None, capture=True)
    assert unguarded.calls == [["ch-run", "x"]]
