"""Executor benchmark (issue 13), side by side in one run, on the testbed:

* Slurm, one call, ``--repeat`` times (medians; the two take turns): ``Executor.submit(fn, x).result()`` against submitit's ``submit`` of the same
  function as one job: the time to submit, and from the result file written to the result in hand.
* Slurm: a 200-item ``map`` of a trivial function with ``nsdf_hpc.Executor(on="slurm")``
  against submitit's ``map_array`` of the same function: the time to submit, and the time
  from the last result file written on the cluster to all results in hand.
* Local: the per-call overhead of ``Executor.submit(fn).result()`` against ``nsdf-run run``
  of the same work (``python3 -c pass``) in the same image and runtime.

    python3 bench/bench_executor.py [--items 200] [--runtime apptainer] [--calls 5] [--json FILE]

The nsdf-hpc map runs twice: as the executor batches it by default (at most 100 tasks, so 2
items per task for 200) and with ``batch_size=1`` (one task per item, as submitit does).
"After last result" is the time from the newest result file on the shared directory (the
last task's end, give or take its teardown) to all results in the caller's hands.

Needs submitit (from PyPI, in a venv, never in the system Python), cloudpickle, the image's
Python of that interpreter's major.minor, and the Slurm work directory shared between the
nodes. On the testbed::

    python3 -m venv --system-site-packages /var/tmp/bench-venv
    /var/tmp/bench-venv/bin/pip install submitit
    PYTHONPATH=$PWD flock /tmp/nsdf-slurm.lock /var/tmp/bench-venv/bin/python bench/bench_executor.py
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

IMAGE = "127.0.0.1:5443/hpc/pydeb:latest"


def trivial(x: int) -> int:
    return x + 1


def _last_mtime(pattern: str) -> float:
    return max(os.stat(p).st_mtime for p in glob.glob(pattern, recursive=True))


def slurm_nsdf(items: int, runtime: str, work: str, batch_size: Optional[int] = None) -> dict:
    import nsdf_hpc
    from nsdf_hpc.client import Client
    client = Client(env={**os.environ, "NSDF_HPC_SLURM_DIR": work})
    with nsdf_hpc.Executor(IMAGE, on="slurm", runtime=runtime, client=client, bind_cwd=False,
                           time="0:10", keep=True, batch_size=batch_size) as ex:
        ex.submit(trivial, 0).result()          # setup (pull, guard probe) outside the timing
        t0 = time.time()
        futs = ex.map_futures(trivial, range(items))
        t_submit = time.time() - t0
        results = [f.result() for f in futs]
        t_done = time.time()
        assert results == [trivial(i) for i in range(items)]
        last = _last_mtime(os.path.join(ex.base or "", "calls", "g2", "items", "*", "result.pkl"))
        tasks = len(ex.jobs[-1].provenance["indices"])
    return {"submit_s": t_submit, "after_last_s": t_done - last, "total_s": t_done - t0, "tasks": tasks}


def _medians(rows: List[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def _one_call(submit: Callable[[], object], results: str, i: int) -> dict:
    """One call, waited for (``submit()`` returns something with ``result()``): the time to
    submit, from the newest file matching ``results`` to the result in hand, and in all."""
    t0 = time.time()
    handle = submit()
    t_submit = time.time() - t0
    result = handle.result()   # type: ignore[attr-defined]
    t_done = time.time()
    assert result == trivial(i)
    return {"submit_s": t_submit, "after_last_s": t_done - _last_mtime(results), "total_s": t_done - t0, "tasks": 1}


def slurm_one_side_by_side(runtime: str, work: str, repeat: int = 5) -> Dict[str, dict]:
    """One call as one job, ``repeat`` times, nsdf-hpc's ``Executor.submit(fn, x).result()``
    and submitit's ``submit`` taking turns (so the machine's drift hits both); medians."""
    import nsdf_hpc
    import submitit  # type: ignore[import-not-found]  # only in the bench venv
    from nsdf_hpc.client import Client
    client = Client(env={**os.environ, "NSDF_HPC_SLURM_DIR": work})
    sub = submitit.AutoExecutor(folder=os.path.join(work, "submitit-one-%j"), cluster="slurm")
    sub.update_parameters(timeout_min=10)
    sub_results = os.path.join(work, "submitit-one-*", "*_result.pkl")
    with nsdf_hpc.Executor(IMAGE, on="slurm", runtime=runtime, client=client, bind_cwd=False,
                           time="0:10", keep=True) as ex:
        ex.submit(trivial, 0).result()          # setup (pull, guard probe) outside the timing
        sub.submit(trivial, 0).result()
        ours = os.path.join(ex.base or "", "calls", "*", "items", "*", "result.pkl")
        rows: Dict[str, List[dict]] = {"nsdf": [], "submitit": []}
        for i in range(repeat):
            rows["nsdf"].append(_one_call(lambda: ex.submit(trivial, i), ours, i))
            rows["submitit"].append(_one_call(lambda: sub.submit(trivial, i), sub_results, i))
    return {k: _medians(v) for k, v in rows.items()}


def slurm_submitit(items: int, work: str) -> dict:
    import submitit  # type: ignore[import-not-found]  # only in the bench venv
    ex = submitit.AutoExecutor(folder=os.path.join(work, "submitit-%j"), cluster="slurm")
    ex.update_parameters(timeout_min=10, slurm_array_parallelism=items)
    t0 = time.time()
    jobs = ex.map_array(trivial, range(items))
    t_submit = time.time() - t0
    results = [j.result() for j in jobs]
    t_done = time.time()
    assert results == [trivial(i) for i in range(items)]
    last = _last_mtime(os.path.join(work, "submitit-*", "*_result.pkl"))
    return {"submit_s": t_submit, "after_last_s": t_done - last, "total_s": t_done - t0, "tasks": items}


def _median_ms(fn: Callable[[], None], n: int) -> float:
    times: List[float] = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def local(runtime: str, calls: int) -> dict:
    import nsdf_hpc
    with nsdf_hpc.Executor(IMAGE, runtime=runtime, bind_cwd=False) as ex:
        ex.submit(trivial, 0).result()          # setup outside the timing
        executor_ms = _median_ms(lambda: ex.submit(trivial, 1).result(), calls)
    argv = [sys.executable, "-m", "nsdf_hpc", "run", "--runtime", runtime, "--no-bind-cwd", IMAGE, "--",
            "python3", "-c", "pass"]
    subprocess.run(argv, check=True, capture_output=True)      # the launch record

    def cli() -> None:
        subprocess.run(argv, check=True, capture_output=True)
    cli_ms = _median_ms(cli, calls)
    return {"executor_call_ms": executor_ms, "nsdf_run_ms": cli_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--runtime", default="apptainer")
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=9, help="single Slurm calls of each, taking turns")
    ap.add_argument("--skip", nargs="*", default=[], choices=["one", "slurm", "local"])
    ap.add_argument("--json", metavar="FILE", help="also save the numbers as JSON")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-exec-", dir="/var/tmp/nsdf-scratch")
    out: dict = {"items": args.items, "runtime": args.runtime, "image": IMAGE}
    try:
        if "one" not in args.skip:
            one = slurm_one_side_by_side(args.runtime, work, args.repeat)
            runs = [("nsdf-hpc Executor.submit", one["nsdf"]), ("submitit submit (host Python)", one["submitit"])]
            print(f"slurm, one call as one job (medians of {args.repeat}, taking turns):")
            for name, r in runs:
                print(f"  {name:34} {r['tasks']:4d} task   submit {r['submit_s'] * 1000:5.1f} ms  after its result "
                      f"{r['after_last_s']:5.2f} s  total {r['total_s']:5.1f} s")
            out["one"] = dict(runs)
        if "slurm" not in args.skip:
            runs = [("nsdf-hpc", slurm_nsdf(args.items, args.runtime, work)),
                    ("nsdf-hpc batch_size=1", slurm_nsdf(args.items, args.runtime, work, batch_size=1)),
                    ("submitit map_array (host Python)", slurm_submitit(args.items, work))]
            print(f"slurm map of {args.items} items:")
            for name, r in runs:
                print(f"  {name:34} {r['tasks']:4d} tasks  submit {r['submit_s'] * 1000:4.0f} ms  after last result "
                      f"{r['after_last_s']:5.2f} s  total {r['total_s']:5.1f} s")
            out["slurm"] = dict(runs)
        if "local" not in args.skip:
            c = local(args.runtime, args.calls)
            print(f"local ({args.runtime}): Executor call {c['executor_call_ms']:.0f} ms (median of {args.calls}) | "
                  f"nsdf-run run python3 -c pass {c['nsdf_run_ms']:.0f} ms")
            out["local"] = c
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
