"""Peak memory of nsdf-run's own process (issue 11 goal 4: at most 35 MB), per real runtime.

* a cold run: `nsdf-run run --runtime R IMG -- true` with a fresh cache, so it asks the TLS
  registry and pulls (IMG: `NSDF_BENCH_COLD_IMAGE`, by default the testbed's pydeb);
* beside it, a planned run of the same image once cached (`NSDF_HPC_NO_FAST_PATH=1`).

`bench/harness.own_peak_rss` reads nsdf-run's `RUSAGE_SELF` at exit, so the runtime it starts
(Apptainer and podman are 35-40 MB alone) is not counted. The times are whole runs, for scale.
When `SSL_CERT_FILE` is set (it names a bundle, which is then parsed whole: 0.8 MB), the cold
run is measured both with it and without it.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import List, Mapping, Optional, Tuple

from harness import Result, bench_venv, own_peak_rss

IMAGE = os.environ.get("NSDF_BENCH_COLD_IMAGE", "127.0.0.1:5443/hpc/pydeb:latest")
RUNTIMES = os.environ.get("NSDF_BENCH_RUNTIMES", "apptainer,charliecloud,podman,podman-hpc,udocker").split(",")


def _measure(python: str, args: List[str], env: Mapping[str, str], cwd: str) -> Tuple[float, Optional[float]]:
    t0 = time.perf_counter()
    peak = own_peak_rss(python, args, env, cwd)
    return (time.perf_counter() - t0) * 1000.0, peak


def run(runs: int = 3) -> list:
    python = os.path.join(bench_venv(), "bin", "python")
    work = tempfile.mkdtemp(prefix="nsdf-bench-mem-")
    base = {k: v for k, v in os.environ.items() if not k.startswith("NSDF_HPC_")}
    variants = [("", base)]
    if "SSL_CERT_FILE" in base:
        variants.append((" (SSL_CERT_FILE unset)", {k: v for k, v in base.items() if k != "SSL_CERT_FILE"}))
    results = []
    for name in RUNTIMES:
        args = ["run", "--runtime", name, IMAGE, "--", "true"]
        kept = os.path.join(work, f"cache-{name}")
        planned_env = {**base, "NSDF_HPC_CACHE": kept, "NSDF_HPC_NO_FAST_PATH": "1"}
        _measure(python, args, planned_env, work)                   # pulls into the kept cache
        planned = [_measure(python, args, planned_env, work) for _ in range(runs)]
        for label, env in variants:
            cold = []
            for _ in range(runs):
                cache = tempfile.mkdtemp(prefix="cold-", dir=work)
                cold.append(_measure(python, args, {**env, "NSDF_HPC_CACHE": cache}, work))
                shutil.rmtree(cache, ignore_errors=True)
            peaks = [p for _, p in cold if p is not None]
            res = Result(f"nsdf-run run -r {name}, cold{label}", "planned run (cached)",
                         statistics.median(t for t, _ in cold), statistics.median(t for t, _ in planned),
                         runs, max(peaks) if peaks else None, "own peak <= 35 MB",
                         max(p for _, p in planned if p is not None))
            res.met = bool(peaks) and max(peaks) <= 35
            res.extra["own peaks MB"] = " ".join(f"{p:.1f}" for p in peaks)
            results.append(res)
        shutil.rmtree(kept, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    from harness import report
    report(run())
