#!/usr/bin/env python3
"""How soon the end of a job is noticed, and what that costs the scheduler (issue 11 goal 5).

For a 2 s job, a 60 s job and a 200-task array, side by side in one run:
- nsdf-hpc: ``Job.wait()`` right after ``submit`` (and for the 60 s job once more through the
  public ``nsdf_hpc.wait_all([job])``, which goes by ``Slurm.wait_all``); the latency is the time it returned minus
  the moment the last task ended (the mtime of the last exit-code file the batch script
  writes as its last step, finer than sacct's whole-second End);
- the tool alone: ``sbatch --wait`` of the same generated script, latency measured the same way.
The scheduler load of the nsdf-hpc wait is read from the daemons' own counters: slurmctld's
``sdiag`` (REQUEST_JOB_INFO*) and slurmdbd's ``sacctmgr show stats`` (DBD_GET_JOBS_COND),
the difference between before and after the wait (other Slurm users must be quiet meanwhile).

    python3 bench/bench_completion.py [--runtime apptainer] [--json out.json]
    python3 bench/run.py completion
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nsdf_hpc  # noqa: E402
from nsdf_hpc.client import Client  # noqa: E402
from nsdf_hpc.schedulers import Slurm, SlurmSettings  # noqa: E402

CTLD = ("REQUEST_JOB_INFO", "REQUEST_JOB_INFO_SINGLE")
DBD = ("DBD_GET_JOBS_COND",)


def _counts(argv: List[str], names: tuple) -> int:
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    total = 0
    for name in names:
        m = re.search(rf"^\s*{name}\s+\(\s*\d+\)\s+count:(\d+)", out, re.M)
        total += int(m.group(1)) if m else 0
    return total


def counters() -> Dict[str, int]:
    return {"slurmctld": _counts(["sdiag"], CTLD), "slurmdbd": _counts(["sacctmgr", "show", "stats"], DBD)}


def _last_end(job_dir: str) -> float:
    d = os.path.join(job_dir, "exit")
    return max(os.stat(os.path.join(d, n)).st_mtime for n in os.listdir(d) if not n.endswith(".tmp"))


def case(client: Client, slurm: Slurm, name: str, runtime: str, seconds: int, tasks: int,
         api: bool = False) -> Dict[str, Any]:
    cmd = ["sleep", str(seconds)]
    kw: Dict[str, Any] = dict(runtime=runtime, scheduler=slurm, job_name=f"bench-{name}")
    job = (client.submit_array("busybox", [cmd] * tasks, **kw) if tasks > 1
           else client.submit("busybox", cmd, **kw))
    before = counters()
    t0 = time.time()
    st = (nsdf_hpc.wait_all([job], timeout=seconds * 4 + 300)[0] if api
          else job.wait(timeout=seconds * 4 + 300))
    t1 = time.time()
    after = counters()
    assert st.final, st
    end = _last_end(job.directory or "")
    queries = {k: after[k] - before[k] for k in before}
    minutes = max(t1 - t0, 60.0) / 60.0    # a job shorter than a minute: its queries in that minute
    # the tool alone: sbatch --wait of the same script (a second job), latency the same way
    script = job.script or ""
    extra = ["--array", f"0-{tasks - 1}"] if tasks > 1 else []
    s0 = time.time()
    sub = subprocess.run(["sbatch", "--wait", "--parsable", *extra, script], capture_output=True, text=True,
                         cwd=job.directory)
    s1 = time.time()
    sid = sub.stdout.strip().split(";")[0]
    d = os.path.join(job.directory or "", "exit")
    mine = [n for n in os.listdir(d) if (n == sid or n.startswith(sid + "_")) and not n.endswith(".tmp")]
    s_end = max(os.stat(os.path.join(d, n)).st_mtime for n in mine) if mine else float("nan")
    return {"case": name, "state": st.native_state, "nsdf_latency_s": round(t1 - end, 3),
            "nsdf_wait_s": round(t1 - t0, 1), "queries": queries,
            "queries_per_min": round(sum(queries.values()) / minutes, 1),
            "sbatch_wait_latency_s": round(s1 - s_end, 3), "sbatch_wait_s": round(s1 - s0, 1)}


def measure(runtime: str, work_dir: str) -> List[Dict[str, Any]]:
    client = Client()
    slurm = Slurm(settings=SlurmSettings(work_dir=work_dir))
    client.pull("busybox", runtime)
    return [case(client, slurm, "2 s job", runtime, 2, 1),
            case(client, slurm, "60 s job", runtime, 60, 1),
            case(client, slurm, "60 s, wait_all", runtime, 60, 1, api=True),
            case(client, slurm, "200-task array", runtime, 1, 200)]


def run() -> list:
    """For ``bench/run.py completion``."""
    from harness import Result
    out = []
    for r in measure("apptainer", "/var/tmp/nsdf-scratch/bench-completion"):
        out.append(Result(f"end noticed: {r['case']} (latency)", "sbatch --wait",
                          r["nsdf_latency_s"] * 1000, r["sbatch_wait_latency_s"] * 1000, 1, None,
                          "<= 1000 ms, <= 6 queries/min",
                          r["nsdf_latency_s"] <= 1.0 and r["queries_per_min"] <= 6,
                          {"queries (daemon counters)": r["queries"], "queries/min": r["queries_per_min"]}))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", default="apptainer")
    ap.add_argument("--work-dir", default="/var/tmp/nsdf-scratch/bench-completion")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    rows = measure(args.runtime, args.work_dir)
    print(f"{'case':<16} {'nsdf latency':>13} {'sbatch --wait':>14} {'queries/min':>12}  daemon counters")
    for r in rows:
        print(f"{r['case']:<16} {r['nsdf_latency_s']:>12.3f}s {r['sbatch_wait_latency_s']:>13.3f}s "
              f"{r['queries_per_min']:>12}  {r['queries']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["nsdf_latency_s"] <= 1.0 and r["queries_per_min"] <= 6 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
