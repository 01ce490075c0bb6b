#!/usr/bin/env python3
"""Slurm layer benchmark, side by side in one run (on demand, never in CI).

1. submit 1000 tasks as ONE array (nsdf_hpc.submit_array) vs 1000 separate ``sbatch`` calls
   of the same script: wall time and ratio;
2. status of those 1000 separate jobs in ONE ``sacct`` call: time;
3. scheduler calls per minute while ``wait_all`` watches the 1000 jobs (counted by a runner
   wrapper), overall and once the poll interval has reached its cap (target: <= 6/min).

Every job is submitted with ``--hold`` so nothing runs, and everything is cancelled at the
end (one ``scancel`` call). Usage::

    python3 bench/bench_slurm.py [--n 1000] [--watch 150] [--runtime udocker] [--json out.json]
    python3 bench/run.py slurm           # the same, in the harness's table
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsdf_hpc._exec import CompletedCommand, SubprocessRunner  # noqa: E402
from nsdf_hpc.client import Client  # noqa: E402
from nsdf_hpc.schedulers import Job, Slurm, SlurmSettings  # noqa: E402
from nsdf_hpc.schedulers.submit import prepare  # noqa: E402


class CountingRunner(SubprocessRunner):
    """Counts every Slurm command (with its start time) on top of the real runner."""

    def __init__(self) -> None:
        self.calls: List[tuple] = []

    def run(self, argv: Sequence[str], **kw: Any) -> CompletedCommand:  # type: ignore[override]
        self.calls.append((time.monotonic(), argv[0]))
        return super().run(argv, **kw)

    def count(self, since: float = 0.0, tools: Sequence[str] = ("sacct", "squeue", "scontrol")) -> int:
        return sum(1 for t, a in self.calls if t >= since and a in tools)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--watch", type=float, default=150.0, help="seconds to watch with wait_all")
    ap.add_argument("--runtime", default="udocker")
    ap.add_argument("--image", default="busybox")
    ap.add_argument("--work-dir", default="/var/tmp/nsdf-scratch/bench-slurm")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    results = measure(args.n, args.watch, args.runtime, args.image, args.work_dir)
    _print(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    ok = results.get("calls_per_min_at_cap") is None or results["calls_per_min_at_cap"] <= 6
    return 0 if ok else 1


def run() -> list:
    """For ``bench/run.py slurm``: the same measurements as harness Results."""
    from harness import Result
    r = measure(1000, 150.0, "udocker", "busybox", "/var/tmp/nsdf-scratch/bench-slurm")
    n = r["n"]
    per_call = r["single_sacct_ms"]
    at_cap = r.get("calls_per_min_at_cap")
    return [
        Result(f"submit {n} tasks: one array", f"{n} separate sbatch", r["array_submit_s"] * 1000,
               r["separate_submit_s"] * 1000, 1, None, "ratio <= 0.1",
               r["array_submit_s"] <= 0.1 * r["separate_submit_s"],
               {"sbatch calls (array)": r["array_sbatch_calls"], "ratio separate/array": r["submit_ratio"]}),
        Result(f"status of {n} jobs in one query", f"one sacct per job (x{n})", r["status_1000_s"] * 1000,
               per_call * n, 1, None, "ratio <= 0.1", r["status_1000_s"] * 1000 <= 0.1 * per_call * n,
               {"calls": r["status_tools"], "baseline": f"median of 20 single sacct calls x {n}"}),
        Result(f"wait_all on {n} jobs: ms between calls at cap", "6 calls/min (10000 ms)",
               60000.0 / at_cap if at_cap else float("nan"), 10000.0, 1, None, ">= 10000 ms",
               bool(at_cap is not None and at_cap <= 6),
               {"calls/min at cap": at_cap, "calls/min overall": r["calls_per_min_overall"],
                "calls by tool": r["watch_calls_by_tool"]}),
    ]


def measure(n: int, watch: float, runtime: str, image: str, work_dir: str) -> Dict[str, Any]:
    runner = CountingRunner()
    slurm = Slurm(runner, SlurmSettings(work_dir=work_dir))
    client = Client(runner=runner)
    args = argparse.Namespace(n=n, watch=watch, runtime=runtime, image=image)
    ids: List[str] = []
    results: Dict[str, Any] = {"n": n}
    try:
        # warm: image pulled, MaxArraySize read (not part of the submit times)
        client.pull(args.image, args.runtime)
        slurm.max_array_size()

        t0 = time.perf_counter()
        arr = client.submit_array(args.image, template=["echo", "{index}"], indices=n,
                                  runtime=args.runtime, scheduler=slurm, job_name="bench-array",
                                  extra_directives=("--hold",))
        t_array = time.perf_counter() - t0
        ids += arr.job_ids
        results["array_sbatch_calls"] = len(arr.job_ids)

        spec = client.job_spec(args.image, ["echo", "x"], job_name="bench-single",
                               extra_directives=("--hold",))
        prep = prepare(client, spec, slurm, args.runtime)
        os.makedirs(prep.inputs.job_dir, exist_ok=True)
        Path(prep.inputs.script_path).write_text(prep.script)
        t0 = time.perf_counter()
        singles = [slurm.sbatch(prep.inputs.script_path) for _ in range(n)]
        t_single = time.perf_counter() - t0
        ids += singles
        results.update(array_submit_s=round(t_array, 3), separate_submit_s=round(t_single, 3),
                       submit_ratio=round(t_single / t_array, 1))

        time.sleep(2)   # let slurmdbd record the last submissions (else scontrol fills in)
        before_i = len(runner.calls)
        t0 = time.perf_counter()
        table = slurm.status(singles)
        t_status = time.perf_counter() - t0
        tools = [a for _, a in runner.calls[before_i:]]
        results.update(status_1000_s=round(t_status, 3), status_calls=len(tools),
                       status_tools="+".join(tools), status_rows=len(table))
        single = []
        for j in singles[:20]:
            t0 = time.perf_counter()
            runner.run(["sacct", "--parsable2", "--noheader", "-X", "-j", j], check=False)
            single.append(time.perf_counter() - t0)
        results["single_sacct_ms"] = round(sorted(single)[len(single) // 2] * 1000, 2)

        jobs = [Job(slurm, [j]) for j in singles]
        start = time.monotonic()
        slurm.wait_all(jobs, timeout=args.watch)
        end = time.monotonic()
        polls = [t for t, a in runner.calls if t >= start and a in ("sacct", "scontrol", "squeue")]
        by_tool: Dict[str, int] = {}
        for t, a in runner.calls:
            if t >= start:
                by_tool[a] = by_tool.get(a, 0) + 1
        results["watch_calls_by_tool"] = by_tool
        cap_reached = start + _time_to_cap(slurm.settings.poll_initial, 1.5, slurm.settings.poll_cap)
        at_cap = [t for t in polls if t >= cap_reached]
        results.update(
            watch_s=round(end - start, 1), watch_calls=len(polls),
            calls_per_min_overall=round(len(polls) / ((end - start) / 60), 2),
            calls_per_min_at_cap=round(len(at_cap) / max(1e-9, (end - cap_reached) / 60), 2)
            if end > cap_reached else None,
            poll_cap_s=slurm.settings.poll_cap)
    finally:
        if ids:
            t0 = time.perf_counter()
            slurm.cancel(ids)
            results["cancel_s"] = round(time.perf_counter() - t0, 3)
    return results


def _time_to_cap(initial: float, factor: float, cap: float) -> float:
    """Upper bound of the time before the interval reaches the cap (no jitter)."""
    t, x = 0.0, initial
    while x < cap:
        t += x
        x *= factor
    return t


def _print(r: Dict[str, Any]) -> None:
    n = r["n"]
    rows = [
        (f"submit {n} tasks: one array ({r.get('array_sbatch_calls')} sbatch call)", f"{r.get('array_submit_s')} s"),
        (f"submit {n} tasks: {n} separate sbatch calls", f"{r.get('separate_submit_s')} s"),
        ("submit time ratio (separate / array)", f"{r.get('submit_ratio')}x"),
        (f"status of {n} jobs ({r.get('status_tools')}: {r.get('status_calls')} call, {r.get('status_rows')} rows)", f"{r.get('status_1000_s')} s"),
        (f"  vs one sacct per job (median of 20 x {n})", f"{round(r.get('single_sacct_ms', 0) * n / 1000, 2)} s"),
        (f"wait_all on {n} jobs for {r.get('watch_s')} s: scheduler calls", f"{r.get('watch_calls')} {r.get('watch_calls_by_tool')}"),
        ("  calls per minute, overall", f"{r.get('calls_per_min_overall')}"),
        (f"  calls per minute at the poll cap ({r.get('poll_cap_s')} s)", f"{r.get('calls_per_min_at_cap')} (target <= 6)"),
        (f"cancel all {2 * n} (one scancel call)", f"{r.get('cancel_s')} s"),
    ]
    width = max(len(a) for a, _ in rows)
    print(f"| {'measure':<{width}} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for a, b in rows:
        print(f"| {a:<{width}} | {b} |")


if __name__ == "__main__":
    sys.exit(main())
