"""The Executor's pure parts and the worker, with no container: the worker script runs with
this interpreter on a call directory the way the container runs it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nsdf_hpc import errors
from nsdf_hpc.executor import (PACK_TRAILER_SIZE, Executor, check_interpreter, load_result,
                               parse_version, task_count, write_calls)

WORKER = Path(__file__).resolve().parents[2] / "nsdf_hpc" / "_pyworker.py"


def test_parse_version():
    assert parse_version("noise\n3.11.2\n") == (3, 11, 2)
    with pytest.raises(errors.ExecutorError, match="Python version"):
        parse_version("Python 3.11")


def test_guard_accepts_same_minor_and_names_both_versions_otherwise():
    check_interpreter("img", "python3", (3, 11, 2), (3, 11, 7))
    with pytest.raises(errors.InterpreterMismatchError) as info:
        check_interpreter("img:1", "python3", (3, 9, 2), (3, 11, 7))
    msg = str(info.value)
    assert "3.9.2" in msg and "3.11.7" in msg and "python=" in msg and "img:1" in msg
    assert isinstance(info.value, errors.SpecError) and info.value.exit_code == 2


@pytest.mark.parametrize("items,batch,max_tasks,want", [
    (0, None, 100, (0, 1)), (5, None, 100, (5, 1)), (200, None, 100, (100, 2)),
    (201, None, 100, (67, 3)), (10, 3, 100, (4, 3)), (1, None, 1, (1, 1))])
def test_task_count(items, batch, max_tasks, want):
    assert task_count(items, batch, max_tasks) == want


def test_task_count_rejects_bad_batch():
    with pytest.raises(errors.SpecError):
        task_count(3, 0, 10)


def test_options_are_checked():
    with pytest.raises(errors.SpecError, match="local"):
        Executor("img", on="cloud")   # type: ignore[arg-type]


@pytest.fixture
def group(tmp_path: Path) -> Path:
    return tmp_path / "g1"       # the worker makes it; its calls are in g1.pkl beside it


def _calls(root: Path, calls):
    write_calls(f"{root}.pkl", calls)


def _worker(root: Path, task: int, batch: int) -> None:
    # the worker finds cloudpickle beside it in the container; here it is installed
    subprocess.run([sys.executable, str(WORKER), str(root), str(task), str(batch)], check=True)


def test_worker_round_trip(group):
    def noisy(x):
        print("out", x)
        os.write(2, b"err\n")
        return x * 2

    def boom():
        raise KeyError("k")

    def weird():
        class Unpicklable(Exception):     # defined here: cloudpickle sends it by value
            def __reduce__(self):
                raise TypeError("no pickling me")
        raise Unpicklable("odd")

    _calls(group, [(noisy, (4,), {}), (boom, (), {}), (weird, (), {}), (lambda: (lambda: 1), (), {})])
    _worker(group, 0, 2)          # items 0 and 1
    _worker(group, 1, 2)          # items 2 and 3
    items = group / "items"
    assert load_result(str(items / "0")) == (True, 8)
    assert (items / "0" / "stdout").read_text() == "out 4\n"
    assert (items / "0" / "stderr").read_text() == "err\n"
    ok, exc = load_result(str(items / "1"))
    assert not ok and isinstance(exc, KeyError)
    assert isinstance(exc.__cause__, errors.RemoteTraceback) and "in boom" in exc.__cause__.text
    ok, exc = load_result(str(items / "2"))
    assert not ok and isinstance(exc, errors.RemoteError)
    assert exc.type_name.endswith("Unpicklable") and "in weird" in exc.remote_traceback
    ok, value = load_result(str(items / "3"))     # a lambda returned: cloudpickle carries it
    assert ok and value() == 1


def test_an_item_that_kills_its_process_loses_neither_the_items_before_nor_after(group):
    def work(x):
        print("item", x)
        if x == 1:
            os.kill(os.getpid(), 9)
        if x == 2:
            os._exit(3)
        return x * 10

    _calls(group, [(work, (n,), {}) for n in range(4)])
    _worker(group, 0, 4)          # one task runs all four; the worker itself exits 0
    items = group / "items"
    # every item is marked done once its result is written, the died ones too (the host
    # lists this one directory on Slurm)
    assert sorted(os.listdir(group / "done")) == ["0", "1", "2", "3"]
    assert [load_result(str(items / str(n))) for n in (0, 3)] == [(True, 0), (True, 30)]
    ok, killed = load_result(str(items / "1"), "item 1 somewhere")
    assert not ok and isinstance(killed, errors.WorkerDiedError) and killed.returncode == 137
    assert str(killed).startswith("item 1 somewhere: the process running the function was killed by "
                                  "signal 9 (SIGKILL, status 137) before returning; SIGKILL")
    assert killed.log_tail == "item 1"        # printed line by line, so kept despite the kill
    ok, exited = load_result(str(items / "2"))
    assert not ok and isinstance(exited, errors.WorkerDiedError) and exited.returncode == 3
    assert "exited with status 3 before returning; the other items ran as usual" in str(exited)


def test_calls_file_one_file_for_all_items_each_task_reads_its_own(group):
    # len's argument is of a class of this test module, pickled by reference (len is not
    # the user's code): the worker cannot import it, as an image lacking a package
    _calls(group, [(str.upper, ("a",), {}), (len, (_Sized(),), {}), (str.upper, ("c",), {})])
    assert not group.exists()                # one file beside the group, no directory
    tail = Path(f"{group}.pkl").read_bytes()[-PACK_TRAILER_SIZE:]
    assert tail.startswith(b"NSDF-CALLS 1 ") and tail.endswith(b"\n")
    _worker(group, 1, 2)               # the last task: item 2 only (no item 3 to run)
    items = group / "items"
    assert sorted(os.listdir(items)) == ["2"] and sorted(os.listdir(group / "done")) == ["2"]
    assert load_result(str(items / "2")) == (True, "C")
    _worker(group, 0, 2)               # items 0 and 1: 1 cannot be loaded, 0 is unharmed
    assert load_result(str(items / "0")) == (True, "A")
    ok, exc = load_result(str(items / "1"))
    assert not ok and isinstance(exc, ModuleNotFoundError) and "test_executor" in str(exc)


class _Sized:
    def __len__(self):
        return 1


def test_calls_file_trailer_is_the_workers():
    import runpy
    worker = runpy.run_path(str(WORKER), run_name="not_main")
    assert len(worker["TRAILER"] % 0) == PACK_TRAILER_SIZE
    assert worker["TRAILER"] == b"NSDF-CALLS 1 %012d\n"


def test_an_unpicklable_call_is_an_executor_error(tmp_path):
    import threading
    with pytest.raises(errors.ExecutorError, match="cannot pickle the call of 'len'"):
        write_calls(str(tmp_path / "calls.pkl"), [(len, (threading.Lock(),), {})])


def test_worker_skips_items_that_have_a_result(group):
    _calls(group, [(len, ("abc",), {})])
    _worker(group, 0, 1)
    first = (group / "items" / "0" / "result.pkl").stat().st_mtime_ns
    _worker(group, 0, 1)        # a requeued task: the item is not run twice
    assert (group / "items" / "0" / "result.pkl").stat().st_mtime_ns == first


def test_user_code_travels_by_value_installed_code_by_reference():
    from nsdf_hpc.executor import user_module
    assert user_module(test_parse_version) is sys.modules[__name__]   # a file of this checkout
    assert user_module(os.path.join) is None                          # the standard library
    assert user_module(pytest.raises) is None                         # site-packages
    assert user_module(len) is None                                   # builtins


class _Job:
    """A job whose exit-code files appear at a given time (the part _JobWatch reads)."""

    def __init__(self, clock, files_at):
        self.clock, self.files_at = clock, files_at

    def exit_files_done(self):
        return None if self.files_at is None else self.clock() >= self.files_at


def _queries(files_at, until=40.0, tick=0.1):
    from nsdf_hpc.executor import _JobWatch
    from nsdf_hpc.schedulers.backoff import Backoff
    now = [0.0]
    base = Backoff(initial=0.5, cap=15.0, jitter=0.0, clock=lambda: now[0], sleep=lambda dt: None)
    watch = _JobWatch(_Job(lambda: now[0], files_at), base)
    out = []
    k = 0
    while now[0] < until:
        if watch.query_due():
            out.append(round(now[0], 1))
        k += 1
        now[0] = round(k * tick, 6)
    return out


def test_slurm_results_cost_the_scheduler_a_query_only_as_wait_does():
    """The Executor's collector asks about a job as wait() does: with its exit-code files
    watched, the first query after 10 s and then x1.5 up to the 15 s cap; once the files
    are there, 0.1 s later to confirm, then 0.2, 0.4, ..."""
    def near(got, want):    # a query comes on the first 0.1 s tick at or after its time
        return len(got) == len(want) and all(0 <= g - w <= 0.1 + 1e-9 for g, w in zip(got, want))
    assert near(_queries(files_at=1e9), [10.0, 25.0])                     # a long job: 2 in 40 s
    assert near(_queries(files_at=3.0, until=5.0), [3.1, 3.3, 3.7, 4.5])  # ended at 3 s
    # a job without the files (not submitted by nsdf-hpc) is asked on the plain schedule
    assert near(_queries(files_at=None, until=4.0), [0.5, 1.25, 2.425])
    # files there but the scheduler never says final (requeued, accounting behind): the
    # confirmation runs once up to the cap, then only the 15 s backstop, never a new burst
    confirm = [3.1, 3.3, 3.7, 4.5, 6.1, 9.3, 15.7, 28.5]
    assert near(_queries(files_at=3.0, until=120.0), confirm + [43.5, 58.5, 73.5, 88.5, 103.5, 118.5])
