#!/usr/bin/env python3
"""The REST backend against the command backend, side by side in one run (on demand, never in CI).

1. submit a 1000-task array (the same prepared script, ``--hold``): one ``sbatch`` vs one
   ``POST /slurm/vX/job/submit``;
2. status of 1000 separate held jobs: ONE ``sacct`` (+ ``scontrol`` for jobs not yet in the
   database) vs ONE ``GET /slurm/vX/jobs``; each measured 5 times, median.

Everything is submitted held and cancelled at the end. Needs root's token::

    SLURMRESTD_URL=http://127.0.0.1:6820 python3 bench/bench_slurm_rest.py [--n 1000] [--json out.json]

The token is read from ``scontrol token`` (stdout), never from argv.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nsdf_hpc.client import Client  # noqa: E402
from nsdf_hpc.schedulers import Slurm, SlurmSettings  # noqa: E402
from nsdf_hpc.schedulers.rest import RestSlurm  # noqa: E402
from nsdf_hpc.schedulers.submit import prepare  # noqa: E402


def _median_s(fn: Callable[[], Any], times: int = 5) -> float:
    out = []
    for _ in range(times):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return round(statistics.median(out), 4)


def measure(n: int, url: str, work_dir: str, runtime: str, image: str) -> Dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JWT"}
    tok = subprocess.run(["scontrol", "token", "lifespan=3600"], capture_output=True, text=True,
                         check=True, env=env).stdout.strip().split("SLURM_JWT=", 1)[1]
    settings = SlurmSettings(work_dir=work_dir)
    commands = Slurm(settings=settings, env=env)
    rest = RestSlurm(settings=settings.model_copy(update={"rest_url": url}), env={"SLURM_JWT": tok})
    client = Client(env={**env, "NSDF_HPC_CACHE": env.get("NSDF_HPC_CACHE", f"/var/tmp/nsdf-hpc-test-cache/{os.getuid()}")})
    client.pull(image, runtime)
    r: Dict[str, Any] = {"n": n, "rest_api": rest.api_version}
    ids: List[str] = []
    try:
        spec = client.job_spec(image, ["echo", "{index}"], job_name="bench-rest-array",
                               array=f"0-{n - 1}", extra_directives=("--hold",))
        prep = prepare(client, spec, commands, runtime)
        os.makedirs(prep.inputs.job_dir, exist_ok=True)
        Path(prep.inputs.script_path).write_text(prep.script)
        for name, backend in (("commands", commands), ("rest", rest)):
            t0 = time.perf_counter()
            ids.append(backend.sbatch(prep.inputs.script_path))
            r[f"array_submit_s_{name}"] = round(time.perf_counter() - t0, 4)
        single = client.job_spec(image, ["true"], job_name="bench-rest-single", extra_directives=("--hold",))
        sp = prepare(client, single, commands, runtime)
        os.makedirs(sp.inputs.job_dir, exist_ok=True)
        Path(sp.inputs.script_path).write_text(sp.script)
        singles = [commands.sbatch(sp.inputs.script_path) for _ in range(n)]
        ids += singles
        time.sleep(2)
        r["status_s_commands"] = _median_s(lambda: commands.status(singles))
        before = rest.requests
        r["status_s_rest"] = _median_s(lambda: rest.status(singles))
        r["rest_requests_per_status"] = (rest.requests - before) / 5
        states = {s.state.value for s in rest.status(singles).values()}
        r["rest_states"] = sorted(states)
    finally:
        if ids:
            commands.cancel(ids)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--url", default=os.environ.get("SLURMRESTD_URL", "http://127.0.0.1:6820"))
    ap.add_argument("--work-dir", default="/var/tmp/nsdf-scratch/bench-slurm-rest")
    ap.add_argument("--runtime", default="udocker")
    ap.add_argument("--image", default="busybox")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    r = measure(args.n, args.url, args.work_dir, args.runtime, args.image)
    print(json.dumps(r, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
