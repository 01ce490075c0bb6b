#!/usr/bin/env python3
"""numpy work inside nsdf/python:v1.0.0, spread over the nodes of a Slurm cluster, with
nsdf_hpc.Executor: a Python function of this script, called once per item, each call in a
container on a compute node.

    python3 examples/executor_numpy.py [--on slurm|local] [--items 4] [--size 400]
                                       [--runtime NAME] [--image REF] [--dry-run]

Each item draws a random symmetric n x n matrix (the Gaussian orthogonal ensemble, scaled by
1/sqrt(2n)) and returns its largest eigenvalue: Wigner's semicircle law says it is close to 2
for large n, whatever the seed. numpy is needed in the image only, not on this host: the
function imports it where it runs and returns plain Python values.

With --on slurm (the default) the items are one Slurm array job, one item per task, and each
task asks for a whole node (sbatch --exclusive), so the tasks that run at the same time run on
different nodes. The Slurm work directory (NSDF_HPC_SLURM_DIR, or work_dir in the [slurm]
table of the config) must be shared between the nodes. The image needs a Python with this
interpreter's major.minor (nsdf/python:v1.0.0 has Debian 12's 3.11; the executor checks).

On the nsdf-hpc testbed, nsdf/python:v1.0.0 is built from recipes/nsdf-python and served by the
local registry (the site's docker.io mirror); elsewhere, build it with
`nsdf-run build --push recipes/nsdf-python`.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any, Dict

import nsdf_hpc


def largest_eigenvalue(seed: int, size: int) -> Dict[str, Any]:
    """Runs in the container, on a compute node."""
    import numpy as np   # the image's numpy

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((size, size))
    h = (a + a.T) / np.sqrt(2 * size)
    top = float(np.linalg.eigvalsh(h)[-1])
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    print(f"seed {seed}: {size}x{size} on {node} with numpy {np.__version__}")
    return {"seed": seed, "node": node, "top": top, "numpy": np.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="nsdf/python:v1.0.0")
    ap.add_argument("--on", choices=("slurm", "local"), default="slurm")
    ap.add_argument("--runtime", help="force a runtime (default: NSDF's choice)")
    ap.add_argument("--items", type=int, default=4)
    ap.add_argument("--size", type=int, default=400, help="the matrices' order n")
    ap.add_argument("--dry-run", action="store_true", help="say what would run, and run nothing")
    args = ap.parse_args()

    # on Slurm the executor takes sbatch resources too: one item per task, a whole node each
    options: Dict[str, Any] = {"bind_cwd": False}
    if args.on == "slurm":
        options.update(time="0:10", exclusive=True, batch_size=1)
    if args.dry_run:
        print(f"would run largest_eigenvalue(seed, {args.size}) for seeds 0..{args.items - 1} in "
              f"{args.image} on {args.on} (runtime: {args.runtime or 'auto'}; options: {options})")
        return 0
    try:
        with nsdf_hpc.Executor(args.image, on=args.on, runtime=args.runtime, **options) as ex:
            futures = ex.map_futures(largest_eigenvalue, range(args.items), [args.size] * args.items)
            results = []
            for f in futures:
                results.append(f.result())
                r = results[-1]
                print(f"item {f.index}: largest eigenvalue {r['top']:.3f} on {r['node']}")
    except nsdf_hpc.NsdfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    mean = sum(r["top"] for r in results) / len(results)
    nodes = sorted({r["node"] for r in results})
    print(f"numpy {results[0]['numpy']} in {args.image}; nodes: {', '.join(nodes)}")
    print(f"mean largest eigenvalue {mean:.3f} (Wigner: about 2 for large n)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
