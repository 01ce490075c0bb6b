"""The executor's signal handling (``_exec.py``) on real processes of the host (no runtime)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from nsdf_hpc._proctree import _comm, _tree, still_starting


def test_still_starting_looks_at_the_whole_process_tree() -> None:
    proc = subprocess.Popen(["sh", "-c", "sleep 30; true"])
    try:
        deadline = time.monotonic() + 10
        # sh has forked, and its child has exec'd sleep (until then the child is named sh too)
        while "sleep" not in [_comm(p) for p in _tree(proc.pid)] and time.monotonic() < deadline:
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


#: the two executors of a streamed run, each printing "status forwarded held" for ARGV, HOLD
#: and STARTED: the executor, and the launch-record path's own spawn (``_launch._spawn_wait``)
RUNNERS = {
    "executor": """
        from nsdf_hpc._exec import SubprocessRunner
        res = SubprocessRunner().run(ARGV, check=False, capture=False, hold=HOLD, started=STARTED, blocked=BLOCK)
        print(res.returncode, res.forwarded, res.held, flush=True)
    """,
    "launch-record": """
        import os
        from nsdf_hpc import _launch
        print(*_launch._spawn_wait(ARGV, dict(os.environ), HOLD, STARTED, BLOCK), flush=True)
    """,
    # the executor with an orphan guard that finds no container to remove (`true`)
    "guarded": """
        from nsdf_hpc._exec import SubprocessRunner, run_guarded
        res = run_guarded(SubprocessRunner(), ARGV, env=None, capture=False, remove=["true"], created=None,
                          hold=HOLD, started=STARTED, blocked=BLOCK)
        print(res.returncode, res.forwarded, res.held, flush=True)
    """,
}


def _streamed(runner: str, argv: list, hold: tuple, started=None, blocked=(), after: str = ""
              ) -> "subprocess.Popen[str]":
    """A Python child that says "ready", then runs ``argv`` with ``runner`` and prints its
    result (then runs ``after``)."""
    code = (f"import sys\nARGV, HOLD, STARTED, BLOCK = {argv!r}, {hold!r}, {started!r}, {tuple(blocked)!r}\n"
            "print('ready', flush=True)\n" + textwrap.dedent(RUNNERS[runner]) + after)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_a_signal_is_held_until_the_command_runs_then_passed_on(runner: str) -> None:
    # the "runtime" is a shell that ignores SIGTERM (a stand-in for a runtime that drops it)
    # while it "sets up" for 0.5 s (sh and sleep are its startup names), then starts the
    # command (tail) and traps SIGTERM: a signal sent during the set-up is held, and passed on
    # once tail exists, which the trap turns into exit 7
    script = ("trap '' TERM; sleep 0.5; trap 'kill $!; exit 7' TERM; "
              "tail -f /dev/null >/dev/null 2>&1 & wait")
    proc = _streamed(runner, ["/bin/sh", "-c", script], ("sh", "sleep"))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.2)   # the handler is installed and the shell is in its 0.5 s
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert out.split() == ["7", str(int(signal.SIGTERM)), "None"], out
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_a_signal_is_not_held_once_the_started_file_names_the_command(runner: str, tmp_path) -> None:
    """``OrphanGuard.started``: once the file names a process that is not a startup name, a
    signal goes on at once (to the innermost process of the runtime's own name)."""
    started = tmp_path / "run.pid"
    script = f"trap 'kill $!; exit 7' TERM; sleep 30 & echo $! > {started}; wait"
    proc = _streamed(runner, ["/bin/sh", "-c", script], ("sh",), str(started))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 10
        while not (started.exists() and started.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=5)
        assert out.split() == ["7", str(int(signal.SIGTERM)), "None"], out
    finally:
        proc.kill()


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_the_runtime_starts_with_pipe_and_file_size_signals_at_their_defaults(runner: str, tmp_path) -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a runtime it starts must not inherit that, or
    ``yes | head`` in the container prints "Broken pipe" and fails (found by hand: the
    Charliecloud launch record, exec'd, ran every command with SIGPIPE ignored)."""
    out = tmp_path / "sigign"
    proc = _streamed(runner, ["/bin/sh", "-c", f"grep SigIgn /proc/self/status > {out}"], ())
    assert proc.communicate(timeout=20)[0].split()[-3:] == ["0", "None", "None"]
    ignored = int(out.read_text().split()[1], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)) and not ignored & (1 << (signal.SIGXFSZ - 1)), hex(ignored)


def _write_status(out) -> list:
    """An argv that writes its own SigBlk (and SigIgn) lines to ``out`` (not a shell: dash
    clears its mask)."""
    return [sys.executable, "-I", "-S", "-c",
            f"open({str(out)!r}, 'w').writelines(l for l in open('/proc/self/status') if l[:6] in ('SigBlk', 'SigIgn'))"]


def _mask(status_file) -> int:
    """The SigBlk mask that ``_write_status`` wrote."""
    return int(dict(line.split() for line in status_file.read_text().splitlines())["SigBlk:"], 16)


def _bits(*signums: int) -> int:
    return sum(1 << (s - 1) for s in signums)


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_the_runtime_starts_with_the_invocations_blocked_signals(runner: str, tmp_path) -> None:
    """``Invocation.blocked_signals`` (udocker's relay, which waits for them itself): blocked
    in the runtime from its first instruction, and only there (this process's own mask is
    as before once the runtime is started)."""
    out = tmp_path / "sigblk"
    after = ("import signal\n"
             "print('mask', sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])), flush=True)\n")
    proc = _streamed(runner, _write_status(out), (), blocked=("SIGINT", "SIGUSR1", "SIGNOSUCH"), after=after)
    lines = proc.communicate(timeout=20)[0].splitlines()
    assert lines[-2].split() == ["0", "None", "None"] and lines[-1] == "mask []", lines
    assert _mask(out) == _bits(signal.SIGINT, signal.SIGUSR1), hex(_mask(out))


def test_the_launch_record_exec_restores_ignored_signals_and_blocks_the_named_ones(tmp_path) -> None:
    """The same for the records that replace nsdf-run with the runtime (``_launch._exec``):
    SIGPIPE and SIGXFSZ at their defaults, ``block`` blocked (grep reads its own status:
    neither a shell, which clears its mask, nor Python, which ignores SIGPIPE itself)."""
    out = tmp_path / "status"
    code = ("import os\nfrom nsdf_hpc import _launch\n"
            f"os.dup2(os.open({str(out)!r}, os.O_WRONLY | os.O_CREAT), 1)\n"
            "_launch._exec(['/bin/grep', '-E', '^Sig(Blk|Ign)', '/proc/self/status'], dict(os.environ),"
            " ['SIGTERM', 'SIGHUP'])\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=20)
    fields = dict(line.split() for line in out.read_text().splitlines())
    ignored, blocked = int(fields["SigIgn:"], 16), int(fields["SigBlk:"], 16)
    assert not ignored & _bits(signal.SIGPIPE, signal.SIGXFSZ), hex(ignored)
    assert blocked == _bits(signal.SIGTERM, signal.SIGHUP), hex(blocked)


def test_with_a_started_file_the_process_it_names_decides(tmp_path) -> None:
    """``OrphanGuard.started`` (podman --pidfile): starting while the file is empty, or while
    the process it names still runs under a startup name; not once that process is gone."""
    started = tmp_path / "run.pid"
    proc = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 10
        while _comm(proc.pid) != "sleep" and time.monotonic() < deadline:   # until it exec'd
            time.sleep(0.01)
        assert still_starting(proc.pid, ("sleep",), str(started))          # no file yet
        started.write_text("")
        assert still_starting(proc.pid, ("sleep",), str(started))          # empty
        started.write_text(f"{proc.pid}\n")
        assert still_starting(proc.pid, ("sleep",), str(started))          # the pre-start name
        assert not still_starting(proc.pid, ("runc:[2:INIT]",), str(started))   # the command
    finally:
        proc.kill()
        proc.wait()
    assert not still_starting(proc.pid, ("sleep",), str(started))          # it ended


@pytest.mark.parametrize("runner", sorted(RUNNERS))
def test_a_signal_still_held_when_the_runtime_ends_is_reported_as_held(runner: str, tmp_path) -> None:
    """A runtime that ends by itself while a signal is held (the container never started: the
    started file stays empty) never passed the signal on: ``held`` says so, and
    ``run_guarded`` reports 128+N, not the runtime's own 0."""
    proc = _streamed(runner, ["/bin/sh", "-c", "trap '' TERM; sleep 0.6"], ("x",), str(tmp_path / "never"))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        term = int(signal.SIGTERM)
        code = 128 + term if runner == "guarded" else 0
        assert out.split() == [str(code), str(term), str(term)], out
    finally:
        proc.kill()


def test_a_signal_right_after_the_child_started_reaches_it() -> None:
    """The window between starting the child and installing the forwarding handlers: a
    SIGTERM there used to end this process (or raise in it) and leave the child running (an
    Apptainer container ran on in CI). Popen is wrapped to send the signal at exactly that
    moment; the child must get it (143) and the parent must return normally."""
    child = textwrap.dedent("""
        import os, signal, subprocess, sys
        from nsdf_hpc._exec import SubprocessRunner
        from nsdf_hpc import _exec
        real = _exec._Popen
        class Popen(real):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                os.kill(os.getpid(), signal.SIGTERM)      # lands before the handlers exist
        _exec._Popen = Popen
        res = SubprocessRunner().run(["sleep", "30"], check=False, capture=False)
        sys.stdout.write(f"{res.returncode} {res.forwarded}\\n")
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    term = int(signal.SIGTERM)
    assert out.stdout.split() == [str(128 + term), str(term)], (out.stdout, out.stderr)


def test_a_signal_right_after_the_launch_record_path_spawned_reaches_the_runtime() -> None:
    """The same window on the launch-record path (``_launch._spawn_wait``, posix_spawn): the
    signals are blocked from before the spawn until the handlers are in place."""
    child = textwrap.dedent("""
        import os, signal, sys
        from nsdf_hpc import _launch
        real = os.posix_spawn
        def spawn(*a, **kw):
            pid = real(*a, **kw)
            os.kill(os.getpid(), signal.SIGTERM)          # lands before the handlers exist
            return pid
        os.posix_spawn = spawn
        print(*_launch._spawn_wait(['/bin/sleep', '30'], dict(os.environ), ('x',)))
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    term = int(signal.SIGTERM)
    assert out.stdout.split() == [str(128 + term), str(term), "None"], (out.stdout, out.stderr)


def test_a_signal_the_cli_took_while_planning_stops_a_streamed_run_from_starting() -> None:
    """The CLI's handler raises Interrupted; raised while Python runs a finalizer (``__del__``)
    the exception is only printed and the planning goes on. The container then ran with
    nobody left to pass the signal on (an `nsdf-run run` hung in 1 of 25 planned-path trials of
    the Apptainer signal test, 2026-12-02). A streamed run now refuses to start after it."""
    child = textwrap.dedent("""
        import os, signal, subprocess, sys
        from nsdf_hpc import cli
        from nsdf_hpc._exec import SubprocessRunner
        signal.signal(signal.SIGTERM, cli._interrupt)
        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)   # the handler runs in here
                for _ in range(1000):
                    pass
        Finalized()
        started = []
        from nsdf_hpc import _exec
        real = _exec._Popen
        class Popen(real):
            def __init__(self, *a, **kw):
                started.append(a[0])
                super().__init__(*a, **kw)
        _exec._Popen = Popen
        try:
            res = SubprocessRunner().run(["sleep", "30"], check=False, capture=False)
            print("ran", res.returncode, started)
        except BaseException as e:
            print(type(e).__name__, started)
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in out.stderr and out.stdout.split() == ["Interrupted", "[]"], (out.stdout, out.stderr)


def test_a_pidfd_wait_with_a_timeout_sleeps_until_the_child_exits_not_in_polls(monkeypatch) -> None:
    """_Popen waits on a pidfd: no waitpid-and-sleep rounds after the pipes close (the stdlib's
    start at 0.5 ms and double), twenty times (the pipes close just before the exit); the
    timeout and the exit status are as Popen's."""
    import subprocess as sp
    from nsdf_hpc._exec import _Popen
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfd_open on this platform (Linux >= 5.3, Python >= 3.9)")
    naps = []
    real_sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda dt: (naps.append(dt), real_sleep(dt)))
    for _ in range(20):
        real_sleep(0.02)      # an idle moment first: then the exit lags the pipes' end (Popen napped 14-17 times of 20)
        with _Popen(["sh", "-c", "echo out; echo err >&2; exit 3"], stdout=sp.PIPE, stderr=sp.PIPE) as p:
            assert p.communicate(timeout=30) == (b"out\n", b"err\n")
        assert p.returncode == 3
    assert naps == []
    with _Popen(["sh", "-c", "kill -9 $$"], stdout=sp.PIPE, stderr=sp.PIPE) as p:
        p.communicate(timeout=30)
    assert p.returncode == -9
    with _Popen(["sleep", "30"], stdout=sp.PIPE, stderr=sp.PIPE) as p:
        with pytest.raises(sp.TimeoutExpired):
            p.communicate(timeout=0.2)
        p.kill()
        p.communicate()
    assert p.returncode == -9
