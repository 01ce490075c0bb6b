"""Run the benchmarks on demand: `python3 bench/run.py [startup|runtimes|images|memory|slurm|build|completion ...]`.

Prints one table (medians, added ms, ratios, peak memory, target met or missed) and saves it
as JSON with `--json FILE`. Needs the testbed for everything but `startup`.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import report  # noqa: E402

SUITES = {"startup": "bench_startup", "runtimes": "bench_runtimes", "images": "bench_images", "memory": "bench_memory",
          "slurm": "bench_slurm", "build": "bench_build", "completion": "bench_completion"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("suites", nargs="*", default=["startup", "runtimes", "images"], choices=list(SUITES))
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    results = []
    for name in args.suites:
        mod = importlib.import_module(SUITES[name])
        print(f"# {name} ...", file=sys.stderr, flush=True)
        results += mod.run()
    report(results, args.json)


if __name__ == "__main__":
    main()
