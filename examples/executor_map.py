#!/usr/bin/env python3
"""Python functions run inside a container image, locally or as one Slurm array job.

    python3 examples/executor_map.py [IMAGE] [--on local|slurm] [--runtime NAME] [--items N]

The function below (a Monte Carlo estimate of pi, standard library only) is defined in this
script's __main__; nsdf_hpc.Executor pickles it with cloudpickle, runs it with the image's
Python and brings results, exceptions and printed output back. The image needs a Python with
this interpreter's major.minor (the executor checks, and says what to do otherwise).

IMAGE defaults to nsdf/pydeb:v1.0.0 (Debian 12's python3 3.11; on the testbed the local
registry serves it). With --on slurm the items become one array job on the cluster (several
items per task when there are many); the Slurm work directory (NSDF_HPC_SLURM_DIR, [slurm]
work_dir) must be shared between the nodes.
"""
from __future__ import annotations

import argparse
import random
import socket
import sys

import nsdf_hpc


def estimate_pi(seed: int, samples: int = 200_000) -> float:
    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    print(f"seed {seed} on {socket.gethostname()}")
    return 4.0 * inside / samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", nargs="?", default="nsdf/pydeb:v1.0.0")
    ap.add_argument("--on", choices=("local", "slurm"), default="local")
    ap.add_argument("--runtime", help="force a runtime (default: NSDF's choice)")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--python", default="python3", help="the interpreter in the image")
    args = ap.parse_args()

    # on Slurm, the executor also takes sbatch resources (time, partition, nodes, ...)
    resources = {"time": "0:10"} if args.on == "slurm" else {}
    try:
        with nsdf_hpc.Executor(args.image, on=args.on, runtime=args.runtime, python=args.python,
                               bind_cwd=False, **resources) as ex:
            futures = ex.map_futures(estimate_pi, range(args.items))
            values = []
            for f in futures:
                values.append(f.result())
                print(f"item {f.index}: {values[-1]:.4f}  ({f.stdout.strip()})")
    except nsdf_hpc.NsdfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pi ~ {sum(values) / len(values):.4f} from {len(values)} containers' work")
    return 0


if __name__ == "__main__":
    sys.exit(main())
