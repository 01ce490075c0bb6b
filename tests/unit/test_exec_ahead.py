"""A command started ahead of its input (``_exec.Started``), on real processes (``sh``):
it gets all of its input or none, never a cut one; discarded, killed with its input open, or
left behind by a process that died, it never acts on a partial input. And the Slurm
backend's choice of when to submit through an ``sbatch`` started ahead (fakes: pure logic)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

import pytest

from nsdf_hpc._exec import CompletedCommand, Started, SubprocessRunner, _AHEAD
from nsdf_hpc.config import SlurmSettings
from nsdf_hpc.errors import ToolNotFoundError
from nsdf_hpc.schedulers.rest import RestSlurm
from nsdf_hpc.schedulers.slurm import AHEAD_MAX_AGE, Slurm

# copies its input to $1, then writes "done N" (N: the bytes it read) to $2: $2 exists only
# once it saw the end of its input, and never when it was killed before
COPY = ["sh", "-c", 'cat > "$1"; wc -c < "$1" > "$2.tmp"; mv "$2.tmp" "$2"; echo done', "sh"]


def _start(tmp_path: Path) -> Started:
    return SubprocessRunner().start([*COPY, str(tmp_path / "in"), str(tmp_path / "ended")])


def test_finish_hands_over_the_whole_input_and_waits(tmp_path: Path) -> None:
    ahead = _start(tmp_path)
    time.sleep(0.05)
    assert ahead.usable() and id(ahead) in _AHEAD
    data = os.urandom(20000)          # more than PIPE_BUF (4096): still one write
    res = ahead.finish(data, timeout=30)
    assert res is not None and res.returncode == 0 and res.stdout == "done\n"
    assert (tmp_path / "in").read_bytes() == data
    assert id(ahead) not in _AHEAD and not ahead.usable()


def test_input_larger_than_the_pipe_is_not_used_and_never_acted_on(tmp_path: Path) -> None:
    import fcntl
    ahead = _start(tmp_path)
    room = fcntl.fcntl(ahead._fd, fcntl.F_GETPIPE_SZ)
    assert ahead.finish(b"x" * (room + 1), timeout=30) is None
    assert ahead.proc.returncode is not None            # killed and reaped
    assert not (tmp_path / "ended").exists()            # it never saw an end of input


def test_discard_kills_it_before_its_input_ends(tmp_path: Path) -> None:
    ahead = _start(tmp_path)
    time.sleep(0.05)
    ahead.discard()
    assert ahead.proc.returncode is not None and not ahead.usable()
    time.sleep(0.1)
    assert not (tmp_path / "ended").exists()
    assert ahead.finish(b"late", timeout=5) is None     # a discarded one is never used


def test_a_command_that_ended_is_not_used(tmp_path: Path) -> None:
    ahead = SubprocessRunner().start(["sh", "-c", "exit 3"])
    ahead.proc.wait(timeout=10)
    assert not ahead.usable() and ahead.finish(b"data", timeout=5) is None


def test_the_process_that_started_it_dies_and_it_reads_an_empty_input(tmp_path: Path) -> None:
    """A process killed (SIGKILL) after it started a command ahead: the command reads the end
    of an empty input (``sbatch``: "Batch script is empty", no job), five times."""
    code = ("import os, signal, sys, time\n"
            "from nsdf_hpc._exec import SubprocessRunner\n"
            f"a = SubprocessRunner().start({COPY!r} + [sys.argv[1], sys.argv[2]])\n"
            "time.sleep(0.05)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    for n in range(5):
        inp, ended = tmp_path / f"in{n}", tmp_path / f"ended{n}"
        r = subprocess.run([sys.executable, "-c", code, str(inp), str(ended)], timeout=60)
        assert r.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while not ended.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended.read_text().strip() == "0" and inp.read_bytes() == b""


def test_a_forked_child_does_not_keep_the_input_open(tmp_path: Path) -> None:
    """A child forked without exec (``multiprocessing``'s fork) closes its copy of the input
    (``os.register_at_fork``): the command sees the end of its input while the child lives."""
    ahead = _start(tmp_path)
    pid = os.fork()
    if pid == 0:    # the child: lives on for 30 s with whatever it inherited
        time.sleep(30)
        os._exit(0)
    try:
        t = time.monotonic()
        res = ahead.finish(b"abc", timeout=15)
        assert res is not None and res.returncode == 0 and time.monotonic() - t < 10
        assert (tmp_path / "in").read_bytes() == b"abc"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


# ------------------------------------------------------------------ the Slurm backend's choice
class FakeAhead:
    def __init__(self, cwd: Optional[str], env: dict, answer: Optional[CompletedCommand]) -> None:
        self.cwd, self.env, self.since = cwd, env, time.monotonic()
        self.answer = answer
        self.given: List[bytes] = []
        self.discarded = False

    def usable(self) -> bool:
        return not self.discarded and not self.given

    def finish(self, data: bytes, timeout: Optional[float] = None) -> Optional[CompletedCommand]:
        self.given.append(data)
        return self.answer

    def discard(self) -> None:
        self.discarded = True


class AheadRunner:
    """Starts FakeAheads (what ``start`` was asked for is recorded) and answers ``run``."""

    def __init__(self, answer: Optional[CompletedCommand] = None) -> None:
        self.started: List[FakeAhead] = []
        self.starts: List[Any] = []
        self.runs: List[Sequence[str]] = []
        self.answer = answer

    def start(self, argv: Sequence[str], *, env: Any = None, cwd: Optional[str] = None) -> FakeAhead:
        self.starts.append((tuple(argv), env, cwd))
        a = FakeAhead(cwd, dict(os.environ if env is None else env), self.answer)
        self.started.append(a)
        return a

    def run(self, argv: Sequence[str], **kw: Any) -> CompletedCommand:
        self.runs.append(tuple(argv))
        return CompletedCommand(tuple(argv), 0, "222\n")

    def run_many(self, argvs: Any, **kw: Any) -> Any:
        raise AssertionError("not used")


def _script(tmp_path: Path) -> str:
    p = tmp_path / "job.sh"
    p.write_text("#!/bin/bash\ntrue\n")
    return str(p)


def test_the_first_submission_goes_through_the_sbatch_started_ahead(tmp_path: Path) -> None:
    runner = AheadRunner(CompletedCommand(("sbatch",), 0, "111\n"))
    slurm = Slurm(runner, SlurmSettings(work_dir=str(tmp_path)), env={"A": "1", "SBATCH_X": "y"})  # type: ignore[arg-type]
    slurm.start_ahead()
    slurm.start_ahead()                  # one is ready: not started again
    assert runner.starts == [(("sbatch", "--parsable"), {"A": "1"}, os.getcwd())]
    assert slurm.sbatch(_script(tmp_path)) == "111"
    assert runner.started[0].given == [b"#!/bin/bash\ntrue\n"] and runner.runs == []
    assert slurm.sbatch(_script(tmp_path)) == "222"        # used up: a plain sbatch
    assert runner.runs == [("sbatch", "--parsable", _script(tmp_path))]


def test_options_another_directory_or_age_submit_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = AheadRunner(CompletedCommand(("sbatch",), 0, "111\n"))
    slurm = Slurm(runner, SlurmSettings(work_dir=str(tmp_path)), env={"A": "1"})  # type: ignore[arg-type]
    script = _script(tmp_path)
    slurm.start_ahead()
    assert slurm.sbatch(script, ["3"], ["--array=0-1"]) == "222"   # a chunk's args: afresh, kept
    assert not runner.started[0].given and not runner.started[0].discarded
    monkeypatch.chdir(tmp_path)                                    # another directory: discarded
    assert slurm.sbatch(script) == "222" and runner.started[0].discarded
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    slurm.start_ahead()
    gone.rmdir()                                                   # the directory removed: discarded
    assert slurm.sbatch(script) == "222" and runner.started[-1].discarded
    monkeypatch.chdir(tmp_path)
    slurm.start_ahead()
    runner.started[-1].since -= AHEAD_MAX_AGE + 1                  # too old: discarded
    assert slurm.sbatch(script) == "222" and runner.started[-1].discarded
    slurm.start_ahead()
    slurm.close_ahead()
    assert runner.started[-1].discarded and slurm._ahead is None


def test_an_ahead_that_cannot_take_the_script_falls_back_to_a_plain_sbatch(tmp_path: Path) -> None:
    runner = AheadRunner(None)            # Started.finish: not used
    slurm = Slurm(runner, SlurmSettings(work_dir=str(tmp_path)), env={})  # type: ignore[arg-type]
    slurm.start_ahead()
    assert slurm.sbatch(_script(tmp_path)) == "222" and len(runner.runs) == 1
    assert slurm.calls == 1


def test_without_an_env_a_changed_environment_submits_afresh(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    runner = AheadRunner(CompletedCommand(("sbatch",), 0, "111\n"))
    slurm = Slurm(runner, SlurmSettings(work_dir=str(tmp_path)))  # type: ignore[arg-type]
    slurm.start_ahead()
    monkeypatch.setenv("SBATCH_PARTITION", "other")   # sbatch reads it: the ahead one did not
    assert slurm.sbatch(_script(tmp_path)) == "222" and runner.started[0].discarded


def test_runners_and_backends_that_cannot_start_ahead(tmp_path: Path) -> None:
    class Plain:
        def run(self, argv: Sequence[str], **kw: Any) -> CompletedCommand:
            return CompletedCommand(tuple(argv), 0, "5\n")
    slurm = Slurm(Plain(), SlurmSettings(work_dir=str(tmp_path)))  # type: ignore[arg-type]
    slurm.start_ahead()
    assert slurm._ahead is None and slurm.sbatch(_script(tmp_path)) == "5"
    rest = RestSlurm.__new__(RestSlurm)
    rest.start_ahead()          # one HTTP request per submission: nothing to start


def test_an_ahead_that_ends_by_itself_is_not_started_again(tmp_path: Path) -> None:
    """A caller starts one after every pause (the Executor's collector): an sbatch that cannot
    start here (it ends at once) must not become a process every pause."""
    runner = AheadRunner(None)
    slurm = Slurm(runner, SlurmSettings(work_dir=str(tmp_path)), env={})  # type: ignore[arg-type]
    slurm.start_ahead()
    runner.started[0].discarded = True      # ended by itself: no longer usable
    for _ in range(5):
        slurm.start_ahead()
    assert len(runner.started) == 1 and slurm._ahead is None
    assert slurm.sbatch(_script(tmp_path)) == "222"


def test_an_sbatch_that_cannot_be_started_ahead_is_not_tried_again(tmp_path: Path) -> None:
    class NoSbatch(AheadRunner):
        def start(self, argv: Sequence[str], *, env: Any = None, cwd: Optional[str] = None) -> FakeAhead:
            self.starts.append(tuple(argv))
            raise ToolNotFoundError("sbatch")
    runner = NoSbatch()
    slurm = Slurm(runner, SlurmSettings(work_dir=str(tmp_path)), env={})  # type: ignore[arg-type]
    for _ in range(5):
        slurm.start_ahead()
    assert len(runner.starts) == 1 and slurm.sbatch(_script(tmp_path)) == "222"


def test_submit_ahead_off_starts_nothing(tmp_path: Path) -> None:
    from nsdf_hpc.config import load_slurm_settings
    settings = load_slurm_settings({"NSDF_HPC_SLURM_SUBMIT_AHEAD": "0", "NSDF_HPC_SLURM_DIR": str(tmp_path)},
                                   files=[])
    assert settings.submit_ahead is False and settings.source("submit_ahead") == "NSDF_HPC_SLURM_SUBMIT_AHEAD"
    runner = AheadRunner()
    slurm = Slurm(runner, settings, env={})  # type: ignore[arg-type]
    slurm.start_ahead()
    assert runner.starts == [] and slurm.sbatch(_script(tmp_path)) == "222"
