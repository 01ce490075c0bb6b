"""The executor's signal handling (``_exec.py``) on real processes of the host (no runtime)."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from nsdf_hpc._proctree import _tree, still_starting


def test_still_starting_looks_at_the_whole_process_tree() -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 30; true"])
    try:
        deadline = time.monotonic() + 10
        while len(_tree(proc.pid)) < 2 and time.monotonic() < deadline:   # sh has started sleep
            time.sleep(0.01)
        # sh alone would be "starting"; its child sleep is a process of another name
        assert not still_starting(proc.pid, ("sh",))
        assert still_starting(proc.pid, ("sh", "sleep"))
    finally:
        proc.kill()
        proc.wait()


def test_a_vanished_process_is_not_starting() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert not still_starting(proc.pid, ("true",))


def test_a_signal_is_held_until_the_command_runs_then_passed_on() -> None:
    # the "runtime" is a shell that ignores SIGTERM (a stand-in for a runtime that drops it)
    # while it "sets up" for 0.5 s (sh and sleep are its startup names), then starts the
    # command (tail) and traps SIGTERM: a signal sent during the set-up is held, and passed on
    # once tail exists, which the trap turns into exit 7
    child = textwrap.dedent("""
        import sys
        from nsdf_hpc._exec import SubprocessRunner
        script = ("trap '' TERM; sleep 0.5; trap 'kill $!; exit 7' TERM; "
                  "tail -f /dev/null >/dev/null 2>&1 & wait")
        sys.stdout.write("ready\\n")
        sys.stdout.flush()
        res = SubprocessRunner().run(["sh", "-c", script], check=False, capture=False,
                                     hold=("sh", "sleep"))
        sys.stdout.write(f"{res.returncode} {res.forwarded}\\n")
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.2)   # the handler is installed and the shell is in its 0.5 s
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert out.split() == ["7", str(int(signal.SIGTERM))], out
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
